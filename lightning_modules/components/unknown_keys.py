"""A misspelt config key, answered with the nearest valid one instead of the whole usage text.

jsonargparse reports an unknown key as a nested union error ("Problem with given class_path
'lightning_modules.TextOnly': Option 'temprature' is not accepted") after some fifty lines of
usage. ``unknown_key_message`` reads which key of which class or group was refused from that
error and names the closest valid keys, as the checkpoint monitor check does for metric tags.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
import typing

_CLASS_OPTION = re.compile(
    r"class_path '(?P<cls>[\w.]+)':\s*(?:Option '(?P<option>[\w.]+)' is not accepted"
    r"|unrecognized arguments: --(?P<argument>[\w.]+))"
)
_GROUP_OPTION = re.compile(
    r"(?P<kind>Group|Subcommand) '(?P<group>[\w.]+)' does not accept option '(?P<option>[\w.]+)'"
)
_PARSER_KEY = re.compile(r'Parser key "(?P<key>[\w.]+)"')
_UNRECOGNIZED = re.compile(r"unrecognized arguments: --(?P<argument>[\w.]+)", re.IGNORECASE)


def _import(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _classes_in(annotation) -> list[type]:
    """The classes an annotation names (``X | None`` and ``Optional[X]`` included)."""
    if isinstance(annotation, type):
        return [annotation]
    return [arg for arg in typing.get_args(annotation) if isinstance(arg, type)]


def _options(cls: type) -> dict[str, object]:
    """Option name -> annotation: a dataclass's fields, or the ``__init__`` arguments along the
    class's bases for as long as each passes ``**kwargs`` on (as jsonargparse reads them)."""
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        return {field.name: hints.get(field.name) for field in dataclasses.fields(cls)}
    options: dict[str, object] = {}
    for base in cls.__mro__:
        if "__init__" not in vars(base) or base is object:
            continue
        try:
            hints = typing.get_type_hints(base.__init__)
        except (NameError, TypeError):  # an annotation that does not resolve here: names still help
            hints = {}
        parameters = inspect.signature(base.__init__).parameters
        for name, parameter in parameters.items():
            if name != "self" and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                options.setdefault(name, hints.get(name))
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            break
    return options


def _nested_options(cls: type, dotted: str) -> tuple[str, list[str]]:
    """For ``text_encoder.poolng`` under TextOnly: ('poolng', the options of TextOnly's text_encoder)."""
    *parents, leaf = dotted.split(".")
    options = _options(cls)
    for parent in parents:
        classes = _classes_in(options.get(parent))
        if parent not in options or not classes:
            return parent, list(options)
        options = _options(classes[0])
    return leaf, list(options)


def _suggestion(wrong: str, valid: list[str]) -> str:
    valid = [key for key in valid if not key.endswith(".help")]
    close = difflib.get_close_matches(wrong, valid, n=3, cutoff=0.6)
    if not close and "." in wrong:
        # A misspelt section (modle.init_args.x): the section corrected, the rest as written.
        first, rest = wrong.split(".", 1)
        sections = sorted({key.split(".", 1)[0] for key in valid})
        close = [f"{name}.{rest}" for name in difflib.get_close_matches(first, sections, n=1, cutoff=0.6)]
        valid = sections
    if close:
        return "did you mean " + " or ".join(f"'{name}'" for name in close) + "?"
    if len(valid) > 25:  # the whole parser: its sections are what a reader scans first
        valid = [key for key in valid if "." not in key]
    return "valid keys: " + ", ".join(sorted(valid)) + "."


def _indexed(key: str) -> str | None:
    if any(part.isdigit() for part in key.split(".")):
        return (
            f"'{key}': a list entry (such as one of trainer.callbacks) cannot be changed by its index "
            "on the command line; change it in the recipe, or in a copy of it passed with --config."
        )
    return None


def unknown_key_message(message: str, parser_keys: list[str]) -> str | None:
    """One paragraph naming the refused key and the nearest valid ones, or None for other errors.

    ``parser_keys``: the dotted keys the parser itself holds (``trainer.max_steps``, ...), for
    keys outside any class_path.
    """
    matches = list(_CLASS_OPTION.finditer(message))
    if matches:
        innermost = matches[-1]  # nested class_paths (data -> audio) report the inner one last
        wrong = innermost["option"] or innermost["argument"]
        sections = [match["key"] for match in _PARSER_KEY.finditer(message[: innermost.start()])]
        if _indexed(wrong):
            return _indexed(".".join([*sections, wrong]))
        try:
            cls = _import(innermost["cls"])
        except (ImportError, AttributeError):
            return None
        leaf, valid = _nested_options(cls, wrong)
        where = f" (under {'.'.join(sections)})" if sections else ""
        return (
            f"{innermost['cls']}{where} has no option '{wrong}': {_suggestion(leaf, valid)} "
            "(`python cli.py fit --help` lists every option.)"
        )
    group = _GROUP_OPTION.search(message)
    if group:
        # A group's options are named within it; a subcommand's by their whole dotted key.
        prefix = group["group"] + "." if group["kind"] == "Group" else ""
        valid = [key[len(prefix) :] for key in parser_keys if key.startswith(prefix)]
        return f"{group['group']} has no option '{group['option']}': {_suggestion(group['option'], valid)}"
    unrecognized = _UNRECOGNIZED.search(message)
    if unrecognized:
        wrong = unrecognized["argument"]
        if _indexed(wrong):
            return _indexed(wrong)
        return f"unknown option --{wrong}: {_suggestion(wrong, parser_keys)}"
    return None
