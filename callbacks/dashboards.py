"""TensorBoard dashboards of the evaluation: the custom-scalars layout, the metrics figure, the
hparams summary. Plain functions over tags, scores and a ``SummaryWriter``; the callback decides
when each is written."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from callbacks.lightning_internals import summary_file_writer


def custom_scalars_layout(tags: Iterable[str]) -> dict:
    """TensorBoard custom-scalars layout: a category per (stage, eval set), a chart per metric
    holding every dim (``<stage>/<set>/<metric>/d<dim>`` tags, matched by a regex)."""
    layout: dict[str, dict[str, list]] = {}
    for tag in sorted(tags):
        match = re.fullmatch(r"(?P<stage>[^/]+)/(?P<set>[^/]+)/(?P<metric>.+)/d\d+", tag)
        if match is None:
            continue
        category = f"{match['stage']}/{match['set']}"
        pattern = f"{re.escape(category)}/{re.escape(match['metric'])}/d\\d+"
        layout.setdefault(category, {})[match["metric"]] = ["Multiline", [pattern]]
    return layout


def metrics_vs_dimension(scores: Mapping[str, float], metrics: Sequence[str], title: str):
    """The figure of one eval set's ``metrics`` (and search costs, ``query_ms_*``) against the dim,
    from its ``<metric>/d<dim>`` scores."""
    from callbacks.figures import metric_vs_dimension_figure

    dims = sorted({int(tag.rsplit("/d", 1)[1]) for tag in scores if tag.startswith(metrics[0] + "/d")})
    values = {metric: [scores[f"{metric}/d{dim}"] for dim in dims] for metric in metrics}
    costs = {
        family: [scores[f"{family}/d{dim}"] for dim in dims]
        for family in sorted({tag.split("/")[0] for tag in scores if tag.startswith("query_ms_")})
    }
    return metric_vs_dimension_figure(dims, values, costs, title)


def write_hparams_summary(
    writer, params: Mapping[str, object], metric_tags: Sequence[str], step: int
) -> None:
    """The run's row in TensorBoard's HParams tab: its (flat) settings, and which scalars are its
    metrics, written with ``writer`` (a ``SummaryWriter``).

    The tab shows each metric's latest point in the run's own scalars, so only the names are
    written. Lightning's ``log_hyperparams(params, metrics)`` would also log the values again at
    the current step: a second point repeating the last validation (at a preemption, at a step
    that was never validated).
    """
    from torch.utils.tensorboard.summary import hparams

    file_writer = summary_file_writer(writer)
    for summary in hparams(dict(params), dict.fromkeys(metric_tags, 0.0)):  # the values are not read
        file_writer.add_summary(summary, step)
