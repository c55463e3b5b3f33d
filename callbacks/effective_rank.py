"""How many directions an embedding set really uses: the spectrum of its centered covariance.

The paper's analysis: information concentrates in a few components, documents are higher-rank
than queries, and small Matryoshka dims are full-rank (so truncation loses information). These
statistics show it per dim; they are biased when there are fewer samples than dimensions (the
covariance has rank at most n - 1), so the sample count travels with them.
"""

from __future__ import annotations

import torch

from callbacks.analysis import EmbeddingAnalysis

ENERGY_LEVELS = (0.90, 0.95, 0.99)


def covariance_eigenvalues(embeddings: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the centered covariance, float64, descending, negatives (round-off) clamped to 0."""
    if embeddings.ndim != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"need a [n >= 2, d] matrix of embeddings, got shape {tuple(embeddings.shape)}.")
    values = embeddings.detach().to(dtype=torch.float64, device="cpu")
    centered = values - values.mean(dim=0, keepdim=True)
    covariance = centered.T @ centered / (values.shape[0] - 1)
    return torch.linalg.eigvalsh(covariance).flip(0).clamp_min(0.0)


def spectrum_stats(embeddings: torch.Tensor, levels=ENERGY_LEVELS) -> dict:
    """Spectrum statistics of ``[n, d]`` embeddings.

    Returns ``energy`` (cumulative energy curve, ``[d]``, float64), ``components@90`` etc. (the
    fewest leading components holding that share of the energy) and ``fraction@90`` (the same
    over ``d``), ``entropy_rank`` (Roy & Vetterli 2007: ``exp`` of the Shannon entropy of the
    centered embedding matrix's normalized singular values, the square roots of the covariance
    eigenvalues; ``d`` for an isotropic set, 1 for a line), ``dim`` and ``samples``.
    """
    eigenvalues = covariance_eigenvalues(embeddings)
    samples, dim = embeddings.shape
    total = eigenvalues.sum()
    stats: dict = {"dim": dim, "samples": samples}
    if total <= 0:  # every embedding identical: no direction carries anything
        stats["energy"] = torch.ones(dim, dtype=torch.float64)
        stats["entropy_rank"] = 0.0
        for level in levels:
            stats[f"components@{round(level * 100)}"] = 0
            stats[f"fraction@{round(level * 100)}"] = 0.0
        return stats
    energy = eigenvalues.cumsum(0) / total
    stats["energy"] = energy
    for level in levels:
        # A tiny tolerance so that exactly reaching a level (e.g. 0.9 in float64) counts.
        components = int(torch.searchsorted(energy, torch.tensor(level - 1e-12, dtype=torch.float64))) + 1
        stats[f"components@{round(level * 100)}"] = components
        stats[f"fraction@{round(level * 100)}"] = components / dim
    # Singular values, not eigenvalues: normalizing the eigenvalues (their squares) gives a
    # smaller number than the measure the literature reports (RankMe uses the same definition).
    singular_values = eigenvalues.sqrt()
    shares = singular_values / singular_values.sum()
    shares = shares[shares > 0]
    stats["entropy_rank"] = float(torch.exp(-(shares * shares.log()).sum()))
    return stats


class EffectiveRank(EmbeddingAnalysis):
    """Logs, per eval set, side (queries / documents) and dim: the Roy-Vetterli entropy rank and the
    components holding 90/95/99 % of the energy (count and fraction of the dim), with the sample
    count; draws the cumulative energy curves of every dim, queries against documents."""

    def __init__(self, levels: tuple[float, ...] = ENERGY_LEVELS):
        """
        Args:
            levels: Energy shares for the component counts (e.g. 0.9 -> ``components@90``).
        """
        self.levels = tuple(levels)
        self._curves: dict[str, dict[str, dict[int, torch.Tensor]]] = {}

    def analyze(self, eval_set, embeddings) -> dict[str, float]:
        metrics: dict[str, float] = {}
        curves: dict[str, dict[int, torch.Tensor]] = {}
        for side, label in (("queries", "queries"), ("corpus", "documents")):
            curves[label] = {}
            for dim, values in sorted(embeddings[side].items()):
                if values.shape[0] < 2:
                    continue
                stats = spectrum_stats(values, self.levels)
                curves[label][dim] = stats["energy"]
                metrics[f"{label}_entropy_rank/d{dim}"] = stats["entropy_rank"]
                for level in self.levels:
                    percent = round(level * 100)
                    metrics[f"{label}_components@{percent}/d{dim}"] = float(stats[f"components@{percent}"])
                    metrics[f"{label}_fraction@{percent}/d{dim}"] = stats[f"fraction@{percent}"]
                metrics[f"{label}_samples"] = float(stats["samples"])
        self._curves[eval_set.name] = curves
        return metrics

    def metric_names(self, dims: list[int]) -> set[str]:
        names = set()
        for label in ("queries", "documents"):
            names.add(f"{label}_samples")
            stats = ["entropy_rank"] + [
                f"{kind}@{round(level * 100)}" for level in self.levels for kind in ("components", "fraction")
            ]
            names |= {f"{label}_{stat}/d{dim}" for stat in stats for dim in dims}
        return names

    def figures(self, eval_set) -> dict:
        curves = self._curves.get(eval_set.name)
        if not curves:
            return {}
        from callbacks.figures import energy_curves_figure

        return {"energy_curves": energy_curves_figure(curves, title=f"{eval_set.name}: cumulative energy")}
