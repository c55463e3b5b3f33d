"""The accuracy-cost grid of a model with early exits: one score per (exit depth, Matryoshka dim).

Plain functions over an ``Evaluator.score`` result, whose exit tags are ``<metric>/L<layer>/d<dim>``
beside the full depth's ``<metric>/d<dim>``. Each cell's cost is what a deployment pays for it:
the query encoder's FLOPs at that depth (every decoder layer costs the same, so ``layer / depth``
of the full model's) and the index bytes at that dim (float32). ``cheapest_cell`` names the cell
a deployment picks: the cheapest that keeps a share of the best score (query depth first, as the
LLM's depth is most of a query's latency, then the index size).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

Grid = dict[int, dict[int, float]]  # {layer: {dim: score}}, the full depth under its own layer count
# An embedding dict's key: a full-depth dim, or (layer, dim) at an early exit
# (the scheme is described in lightning_modules/components/early_exit.py).
ExitKey = int | tuple[int, int]


def exit_layers(embeddings: Mapping[ExitKey, torch.Tensor]) -> list[int]:
    """The early exits present in an embedding dict, ascending (the full depth not included)."""
    return sorted({key[0] for key in embeddings if isinstance(key, tuple)})


def exit_view(embeddings: Mapping[ExitKey, torch.Tensor], layer: int | None) -> dict[int, torch.Tensor]:
    """``{dim: [B, dim]}`` at one exit (``None``: the full depth); a side without that exit's keys
    is read at full depth (a frozen document tower that does not exit)."""
    full = {key: value for key, value in embeddings.items() if not isinstance(key, tuple)}
    if layer is None:
        return full
    at_exit = {
        key[1]: value for key, value in embeddings.items() if isinstance(key, tuple) and key[0] == layer
    }
    return at_exit or full


def with_exits(
    full: Mapping[int, torch.Tensor], exits: Mapping[int, Mapping[int, torch.Tensor]]
) -> dict[ExitKey, torch.Tensor]:
    """The full-depth ``{dim: ...}`` plus each exit's ``{(layer, dim): ...}`` in one dict."""
    merged: dict[ExitKey, torch.Tensor] = dict(full)
    for layer, slices in exits.items():
        merged |= {(layer, dim): value for dim, value in slices.items()}
    return merged


def exit_tag(tag: str, layer: int) -> str:
    """``ndcg@10/d256`` at exit 4 -> ``ndcg@10/L4/d256``."""
    metric, _, dim = tag.rpartition("/d")
    return f"{metric}/L{layer}/d{dim}"


def exit_grid(scores: Mapping[str, float], metric: str, depth: int) -> Grid:
    """``{layer: {dim: score}}`` of ``metric`` from exit tags and the full depth's tags."""
    grid: Grid = {}
    for tag, value in scores.items():
        name, _, dim = tag.rpartition("/d")
        if not dim.isdigit():
            continue
        if name == metric:
            grid.setdefault(depth, {})[int(dim)] = value
        elif name.startswith(metric + "/L") and name[len(metric) + 2 :].isdigit():
            grid.setdefault(int(name[len(metric) + 2 :]), {})[int(dim)] = value
    return dict(sorted(grid.items()))


@dataclass(frozen=True)
class Cell:
    layer: int
    dim: int
    score: float
    flops_share: float  # the query encoder's FLOPs at this depth over the full depth's
    index_bytes: int  # the corpus stored at this dim in float32

    def describe(self, depth: int) -> str:
        return (
            f"L{self.layer}/d{self.dim} = {self.score:.4f} (query FLOPs {self.layer}/{depth} layers = "
            f"{self.flops_share:.0%}, index {self.index_bytes / 1e6:.2f} MB float32)"
        )


def cells(grid: Grid, depth: int, corpus_rows: int) -> list[Cell]:
    itemsize = torch.finfo(torch.float32).bits // 8
    return [
        Cell(layer, dim, score, layer / depth, corpus_rows * dim * itemsize)
        for layer, row in grid.items()
        for dim, score in row.items()
    ]


def cheapest_cell(grid: Grid, depth: int, corpus_rows: int, share: float) -> tuple[Cell, Cell]:
    """(the best cell, the cheapest cell scoring at least ``share`` of it)."""
    every = cells(grid, depth, corpus_rows)
    best = max(every, key=lambda cell: (cell.score, -cell.layer, -cell.dim))
    keeping = [cell for cell in every if cell.score >= share * best.score]
    return best, min(keeping, key=lambda cell: (cell.layer, cell.dim))


def grid_table(title: str, grid: Grid, depth: int, corpus_rows: int) -> str:
    """Exits as rows (with their FLOPs share), dims as columns (with their index size)."""
    dims = sorted({dim for row in grid.values() for dim in row})
    itemsize = torch.finfo(torch.float32).bits // 8
    head = f"{title:<24}" + "".join(f"{'d' + str(dim):>9}" for dim in dims) + "   query FLOPs"
    lines = [head]
    for layer, row in sorted(grid.items(), reverse=True):
        label = f"  L{layer}" + (" (full)" if layer == depth else "")
        values = "".join(f"{row[dim]:9.4f}" if dim in row else " " * 9 for dim in dims)
        lines.append(f"{label:<24}{values}   {layer / depth:>10.0%}")
    sizes = "".join(f"{corpus_rows * dim * itemsize / 1e6:9.2f}" for dim in dims)
    lines.append(f"{'  index MB (float32)':<24}{sizes}")
    return "\n".join(lines)


def exit_grid_figure(grid: Grid, depth: int, metric: str, title: str):
    """A heatmap of the grid: exits as rows (deepest on top), dims as columns, scores written in."""
    from callbacks.figures import heatmap_figure

    layers = sorted(grid, reverse=True)
    dims = sorted({dim for row in grid.values() for dim in row})
    values = [[grid[layer].get(dim, float("nan")) for dim in dims] for layer in layers]
    rows = [f"L{layer}" + (" (full)" if layer == depth else "") for layer in layers]
    return heatmap_figure(values, rows, [f"d{dim}" for dim in dims], metric, title)
