"""Resolving a data location: a local file, a local folder, or a Hugging Face hub dataset name."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from errors import ConfigError, DataError

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def looks_local(location: str) -> bool:
    """A path written as a path (explicit prefix, a file extension, or an existing file/folder)."""
    path = Path(location)
    return (
        path.exists()
        or location.startswith(("/", "./", "../", "~"))
        or path.suffix in FILE_BUILDERS
        or location.count("/") > 1
    )


def json_lines(path: Path) -> Iterator[tuple[int, object]]:
    """``(line number, value)`` of every non-blank line of a JSON Lines file.

    A broken line is a ``DataError`` naming the file, its line and the column in that line
    (``json``'s own "line 1 column 5" counts within the text it was given, beside the real line).
    """
    with open(path, encoding="utf-8-sig") as handle:  # a byte-order mark is not data
        for number, line in enumerate(handle, start=1):
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                where = "at the end of the line" if error.pos >= len(text) else f"at column {error.colno}"
                raise DataError(f"{path}:{number}: not valid JSON {where} ({error.msg}).") from error
            yield number, value


def undecoded_audio(dataset):
    """Audio columns read as ``{bytes, path}``: decoding happens in ``datamodules.audio`` (soundfile),
    since ``datasets``' own decoder needs torchcodec + FFmpeg."""
    from datasets import Audio

    for name, feature in (dataset.features or {}).items():
        if isinstance(feature, Audio) and feature.decode:
            dataset = dataset.cast_column(name, Audio(decode=False))
    return dataset


def relative_path_roots(location: str | None) -> tuple[Path, ...] | None:
    """Where a training file's relative audio paths start: its folder (as an eval set's start at
    its BEIR folder), then the working directory, where a script that wrote the data from the
    project root would have started them; a path must stay in the folder it starts at (see
    ``data.audio.allow_outside_paths``). None for hub datasets (paths start where they are)."""
    if not location or not looks_local(location):
        return None
    path = Path(location).expanduser()
    return (path if path.is_dir() else path.parent, Path.cwd())


def _load_columns(*args, columns: list[str] | None, **kwargs):
    """``load_dataset(*args, streaming=True)``, reading only ``columns`` where the format can.

    Parquet (local or on the hub) reads just those columns: ``select_columns`` alone drops the
    others only after reading whole row groups, so listing a speech dataset's documents read
    every clip's audio too (100x slower on 1 MB clips). Other formats read whole rows anyway.
    """
    import datasets

    if columns is None:
        return datasets.load_dataset(*args, streaming=True, **kwargs)
    try:
        return datasets.load_dataset(*args, streaming=True, columns=columns, **kwargs)
    except (TypeError, ValueError) as error:  # the format's config has no 'columns' (JSON, CSV)
        if "columns" not in str(error):
            raise
    return datasets.load_dataset(*args, streaming=True, **kwargs).select_columns(columns)


def load_stream(
    location: str,
    split: str = "train",
    config_name: str | None = None,
    key: str = "data",
    columns: list[str] | None = None,
):
    """A streaming ``datasets.IterableDataset`` over a local file/folder or a hub dataset
    (only ``columns``, when given)."""
    if looks_local(location):
        path = Path(location).expanduser()
        if not path.exists():
            raise ConfigError(f"{key}={location!r}: no such file or folder (resolved to {path.resolve()}).")
        builder = FILE_BUILDERS.get(path.suffix) if path.is_file() else None
        if path.is_file() and builder is None:
            raise ConfigError(f"{key}={location!r}: unknown file type; use one of {sorted(FILE_BUILDERS)}.")
        try:
            if builder is not None:
                dataset = _load_columns(builder, data_files=str(path), split="train", columns=columns)
            else:
                dataset = _load_columns(str(path), split=split, columns=columns)
        except Exception as error:  # an empty file ends in a bare StopIteration inside datasets
            raise read_error(key, location, error) from error
        return undecoded_audio(dataset)
    try:
        return undecoded_audio(_load_columns(location, config_name, split=split, columns=columns))
    except Exception as error:  # hub errors are long; say what was tried first
        raise ConfigError(
            f"{key}={location!r} is neither a local path nor a loadable hub dataset "
            f"({type(error).__name__}: {error})"
        ) from error


def _data_files(path: Path) -> list[Path]:
    """The files ``datasets`` reads for a local file or folder (the formats it is given here)."""
    if path.is_file():
        return [path]
    return sorted(file for file in path.rglob("*") if file.is_file() and file.suffix in FILE_BUILDERS)


def _check_json(path: Path) -> None:
    """Raises the ``DataError`` naming a JSON file's first broken line, if it has one."""
    with open(path, encoding="utf-8-sig") as handle:
        whole_document = handle.read(4096).lstrip().startswith("[")  # a .json list, not JSON Lines
    if not whole_document:
        for _ in json_lines(path):
            pass
        return
    text = path.read_text(encoding="utf-8-sig")
    try:
        json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}:{error.lineno}: not valid JSON at column {error.colno} ({error.msg})."
        ) from error


def read_error(key: str, location: str, error: BaseException) -> DataError | None:
    """What a failure to read local training data means, as a ``DataError`` naming the file (and
    the line of a broken JSON line); None for a hub dataset, whose errors need not be the data's.

    Called once reading has failed: only then are the files checked (scanned line by line).
    """
    if not looks_local(location):
        return None
    path = Path(location).expanduser()
    files = _data_files(path) if path.exists() else []
    empty = [file for file in files if file.stat().st_size == 0]
    if empty and path.is_file():
        return DataError(
            f"{key}={location!r} is empty (0 bytes): put query/document pairs in it, or point {key} "
            "at the file that has them."
        )
    if empty:
        return DataError(f"{key}={location!r}: {empty[0]} is empty (0 bytes): fill it or remove it.")
    for file in files:
        if file.suffix in (".json", ".jsonl"):
            try:
                _check_json(file)
            except DataError as broken:
                return DataError(f"{key}={location!r}: {broken} Fix or remove that line.")
    summary = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return DataError(f"{key}={location!r} cannot be read ({type(error).__name__}: {summary}).")
