"""Figures for TensorBoard image summaries (matplotlib, drawn off-screen)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on training machines

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def metric_vs_dimension_figure(
    dims: list[int],
    metrics: dict[str, list[float]],
    costs: dict[str, list[float]] | None = None,
    title: str = "",
):
    """Accuracy metrics against the Matryoshka dim (left axis), costs on a right axis, log2 x."""
    figure, axis = plt.subplots(figsize=(6, 4), dpi=100)
    for label, values in metrics.items():
        axis.plot(dims, values, marker="o", label=label)
    axis.set_xscale("log", base=2)
    axis.set_xticks(dims, [str(d) for d in dims])
    axis.set_xlabel("Matryoshka dimension")
    axis.set_ylabel("score")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    handles, labels = axis.get_legend_handles_labels()
    if costs:
        cost_axis = axis.twinx()
        colors = ("tab:gray", "tab:brown", "tab:olive", "tab:pink")
        for (label, values), color in zip(costs.items(), colors, strict=False):
            cost_axis.plot(dims, values, linestyle="--", marker="s", color=color, label=label)
        cost_axis.set_ylabel("search time per query (ms)")
        more_handles, more_labels = cost_axis.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    axis.legend(handles, labels, loc="upper left", fontsize=8)
    axis.set_title(title)
    figure.tight_layout()
    return figure


def energy_curves_figure(curves: dict[str, dict[int, torch.Tensor]], title: str = ""):
    """Cumulative energy against the fraction of components, one line per dim, a panel per side."""
    sides = [side for side in curves if curves[side]]
    figure, axes = plt.subplots(1, len(sides), figsize=(5 * len(sides), 4), dpi=100, squeeze=False)
    for axis, side in zip(axes[0], sides, strict=True):
        for dim, energy in sorted(curves[side].items()):
            fraction = torch.arange(1, len(energy) + 1, dtype=torch.float64) / len(energy)
            axis.plot(fraction.numpy(), energy.numpy(), label=f"d{dim}")
        axis.axhline(0.9, color="gray", linewidth=0.5, linestyle=":")
        axis.set_xlabel("fraction of components")
        axis.set_ylabel("cumulative energy")
        axis.set_ylim(0, 1.01)
        axis.set_title(side)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def heatmap_figure(
    values: list[list[float]], rows: list[str], columns: list[str], label: str, title: str = ""
):
    """A score heatmap (rows x columns, each cell's value written in), 0..1 colour scale."""
    figure, axis = plt.subplots(figsize=(1.2 * len(columns) + 2.5, 0.5 * len(rows) + 1.6), dpi=100)
    image = axis.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    axis.set_xticks(range(len(columns)), columns)
    axis.set_yticks(range(len(rows)), rows)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            color = "black" if value > 0.6 else "white"
            axis.text(j, i, f"{value:.3f}", ha="center", va="center", color=color, fontsize=8)
    figure.colorbar(image, ax=axis, label=label)
    axis.set_title(title)
    figure.tight_layout()
    return figure
