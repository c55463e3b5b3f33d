"""Evaluation scores as text for the terminal: one line per eval set, or a metric x dim table.

TensorBoard holds every number; these are what a user reads while a run goes: after each
validation of ``fit``, the headline metric of every eval set per dim, and after ``validate`` or
``test`` the eval set's metrics as rows with the dims as columns.
"""

from __future__ import annotations

from collections.abc import Mapping


def by_metric(scores: Mapping[str, float]) -> dict[str, dict[int, float]]:
    """``{"ndcg@10/d256": v, ...}`` -> ``{"ndcg@10": {256: v}}`` (tags without a dim are left out)."""
    table: dict[str, dict[int, float]] = {}
    for tag, value in scores.items():
        metric, _, dim = tag.rpartition("/d")
        if metric and dim.isdigit():
            table.setdefault(metric, {})[int(dim)] = value
    return table


def headline(title: str, metric: str, values: Mapping[int, float]) -> str:
    """``val demo ndcg@10: d32 0.525 | d64 0.552`` (dims ascending)."""
    return f"{title} {metric}: " + " | ".join(f"d{dim} {values[dim]:.3f}" for dim in sorted(values))


def score_table(title: str, scores: Mapping[str, float]) -> str:
    """A metric x dim table of ``scores``, metrics in their given order, under ``title``."""
    table = by_metric(scores)
    dims = sorted({dim for values in table.values() for dim in values})
    width = max([len(title), *(len(metric) + 2 for metric in table)])
    lines = [title.ljust(width) + "".join(f"{'d' + str(dim):>9}" for dim in dims)]
    for metric, values in table.items():
        cells = "".join(f"{values[dim]:9.4f}" if dim in values else " " * 9 for dim in dims)
        lines.append(f"  {metric}".ljust(width) + cells)
    return "\n".join(lines)
