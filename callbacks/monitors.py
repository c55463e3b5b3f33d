"""Checkpoint monitors from what an Evaluator logs: ``auto``'s tag, and why a named one never comes.

A monitor naming a metric no validation logs fails only after the first validation (hours in, at
the recipes' ``val_check_interval``); the tags are known before the first step, so the callback
asks here at fit start. ``auto`` (the default of ``best_checkpoint.monitor``) stands for the run's
own first eval set, so a recipe does not name the set of the data it was written for.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence

from callbacks.evaluation import Evaluator
from callbacks.metrics import CLASSIFICATION_METRICS, RETRIEVAL_MEASURES

AUTO = "auto"


def automatic_monitor(evaluator: Evaluator, kinds: Mapping[str, str], dims: Sequence[int]) -> str | None:
    """The tag ``monitor: auto`` stands for: the first retrieval eval set's headline metric
    (nDCG at the largest cut-off) at the largest dim, e.g. ``val/fr2en/ndcg@10/d1024``; with
    classification sets only, the first one's accuracy. None without eval sets or dims.
    """
    if not kinds or not dims:
        return None
    name = next((name for name, kind in kinds.items() if kind == "retrieval"), next(iter(kinds)))
    return f"val/{name}/{evaluator.headline_metric(kinds[name])}/d{max(dims)}"


def _resembles(metric: str, names: set[str]) -> bool:
    """Whether ``metric`` looks like a misspelling of one of ``names`` (case, or a letter or two)."""
    lowered = {name.lower() for name in names}
    return metric.lower() in lowered or bool(
        difflib.get_close_matches(metric.lower(), lowered, n=1, cutoff=0.85)
    )


def unknown_monitor(
    monitor: str,
    evaluator: Evaluator,
    kinds: Mapping[str, str],
    dims: Sequence[int],
    exits: Sequence[int] = (),
) -> str | None:
    """Why ``monitor`` (``val/<eval set>/<metric>/d<dim>``, or ``val/<eval set>/<metric>/L<layer>/d<dim>``
    at an early exit) will never be logged, or None.

    ``kinds`` maps each eval set's name to its kind (``retrieval`` or ``classification``);
    ``dims`` are the model's Matryoshka dims, ``exits`` its early exits (``matryoshka_layers``
    below the full depth). Tags of other stages (``train/loss``) pass.
    """
    parts = monitor.split("/")
    if len(parts) < 3 or parts[0] != "val":
        return None  # not one of the evaluator's tags
    exit_part = parts[-2] if len(parts) >= 5 else ""
    if exit_part[:1] == "L" and exit_part[1:].isdigit():
        return _unknown_exit_monitor(monitor, int(exit_part[1:]), evaluator, kinds, dims, exits)
    name, metric, last = parts[1], "/".join(parts[2:-1]), parts[-1]
    if len(parts) == 3 and last.partition("@")[0] in RETRIEVAL_MEASURES + CLASSIFICATION_METRICS:
        return f"the evaluator logs {last} once per dim: add /d<dim>, e.g. {monitor}/d{max(dims or [0])}."
    if name not in kinds:
        return (
            f"no eval set is named {name!r} (eval sets: {sorted(kinds)}); rename the set in "
            "data.eval_sets or change the monitor."
        )
    if last.startswith("d") and last[1:].isdigit() and int(last[1:]) not in dims:
        return f"d{last[1:]} is not one of the model's matryoshka_dims {list(dims)}."
    measure, _, cutoff = metric.partition("@")
    if kinds[name] == "retrieval" and measure in RETRIEVAL_MEASURES:
        if not cutoff.isdigit() or int(cutoff) not in evaluator.ks:
            return f"the evaluator's cut-offs are ks={list(evaluator.ks)}."
    kind, tag = kinds[name], "/".join(parts[2:])
    logged = evaluator.metric_names(kind, dims)
    known = logged if logged is not None else evaluator.own_metric_names(kind, dims)
    if tag in known:
        return None
    if logged is None and not _resembles(metric or tag, {n.rsplit("/d", 1)[0] for n in known}):
        return None  # maybe the metric of an analysis that does not list its names
    close = difflib.get_close_matches(tag, sorted(known), n=3)
    hint = f" Did you mean {', '.join(f'val/{name}/{c}' for c in close)}?" if close else ""
    return f"eval set {name!r} ({kind}) logs no {tag!r}.{hint}"


def _unknown_exit_monitor(
    monitor: str,
    layer: int,
    evaluator: Evaluator,
    kinds: Mapping[str, str],
    dims: Sequence[int],
    exits: Sequence[int],
) -> str | None:
    """An exit's tag: the exit must be one of the model's, and the metric one the evaluator scores
    at every exit (its own metrics per dim; the analyses read the full depth only)."""
    if layer not in exits:
        trained = f"its early exits are {list(exits)}" if exits else "it has no early exits"
        return (
            f"L{layer} is not an exit of this model ({trained}; model.matryoshka_layers); the full "
            "depth is logged without /L<layer>."
        )
    parts = monitor.split("/")
    full_depth = "/".join(parts[:-2] + parts[-1:])
    problem = unknown_monitor(full_depth, evaluator, kinds, dims)
    if problem:
        return problem
    name, tag = parts[1], "/".join(parts[2:-2] + parts[-1:])
    if tag not in evaluator.own_metric_names(kinds[name], dims):
        return f"{tag!r} is scored at the full depth only; early exits log the evaluator's metrics per dim."
    return None
