"""Discrete acoustic units: speech frames -> the nearest of K centroids (plain code, no Lightning).

The unit-fusion design (Palma Gomez et al. 2024, arXiv 2404.01616) feeds a text LLM speech as
tokens of a new vocabulary: the frames of one middle layer of a frozen self-supervised speech
encoder, optionally pooled to a lower rate (HuBERT gives 50 Hz, the paper used 25 Hz), each
replaced by its nearest centroid of a k-means codebook fitted on training audio (the paper: 1024
units). Collapsing runs of the same unit (GSLM's practice; the paper is silent) is a switch.

Masks travel through every step: a padded frame never becomes a unit, and a clip's units are the
same alone and batched with longer clips (pooling windows start at each clip's first frame).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

PAD_UNIT = -1  # the unit id of padding positions


@dataclass(frozen=True)
class UnitSettings:
    """How frames become units; saved with the codebook, since together they define the tokens."""

    layer: int
    """The speech encoder's hidden state the units are read from (0: its input projection)."""
    pool: int = 1
    """Frames averaged into one before assignment (2: 50 Hz -> 25 Hz, as the paper)."""
    collapse_runs: bool = False
    """Replace each run of one unit by a single unit (GSLM's practice)."""


def pool_frames(frames: torch.Tensor, mask: torch.Tensor, pool: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Means of ``pool`` consecutive real frames: ``[B, T, D]``, mask ``[B, T]`` -> ``[B, ceil(T/pool), D]``.

    Frames are right-padded; a window holding some real frames averages those alone (a clip's last
    window may be short), and a window of padding only is padding.
    """
    if pool < 1:
        raise ValueError(f"pool must be >= 1, got {pool}.")
    if pool == 1:
        return frames, mask
    batch, length, width = frames.shape
    windows = -(-length // pool)
    padded = torch.zeros(batch, windows * pool, width, dtype=frames.dtype, device=frames.device)
    padded[:, :length] = frames
    real = torch.zeros(batch, windows * pool, dtype=frames.dtype, device=frames.device)
    real[:, :length] = mask.to(frames.dtype)
    counts = real.view(batch, windows, pool).sum(dim=2)
    sums = (padded * real[..., None]).view(batch, windows, pool, width).sum(dim=2)
    return sums / counts.clamp_min(1)[..., None], (counts > 0).long()


def collapse_runs(units: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each run of one unit kept once, rows left-aligned and right-padded with ``PAD_UNIT``."""
    real = mask.bool()
    previous = torch.cat([torch.full_like(units[:, :1], PAD_UNIT), units[:, :-1]], dim=1)
    keep = real & (units != previous)
    lengths = keep.sum(dim=1)
    width = int(lengths.max()) if units.shape[0] else 0
    out = torch.full((units.shape[0], width), PAD_UNIT, dtype=units.dtype, device=units.device)
    positions = keep.long().cumsum(dim=1) - 1  # where each kept unit lands in its row
    rows = torch.arange(units.shape[0], device=units.device)[:, None].expand_as(units)
    out[rows[keep], positions[keep]] = units[keep]
    new_mask = (torch.arange(width, device=units.device)[None, :] < lengths[:, None]).long()
    return out, new_mask


class UnitCodebook:
    """K centroids and the settings that turn one layer's frames into their ids."""

    def __init__(self, centroids: torch.Tensor | np.ndarray, settings: UnitSettings):
        self.centroids = torch.as_tensor(centroids, dtype=torch.float32)
        if self.centroids.ndim != 2 or self.centroids.shape[0] < 2:
            raise ValueError(f"centroids must be [K >= 2, D], got {tuple(self.centroids.shape)}.")
        self.settings = settings

    @property
    def size(self) -> int:
        return self.centroids.shape[0]

    def assign(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The nearest centroid (squared Euclidean) of every real frame; ``PAD_UNIT`` elsewhere."""
        centroids = self.centroids.to(frames.device)
        flat = frames.reshape(-1, frames.shape[-1]).float()
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 is the same for every c, so it is left out.
        distances = centroids.pow(2).sum(dim=1)[None, :] - 2 * flat @ centroids.T
        units = distances.argmin(dim=1).reshape(frames.shape[:-1])
        return units.masked_fill(~mask.bool(), PAD_UNIT)

    def units(self, frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames of ``settings.layer`` (``[B, T, D]`` with their mask) -> units ``[B, U]`` and mask."""
        frames, mask = pool_frames(frames, mask, self.settings.pool)
        units = self.assign(frames, mask)
        if self.settings.collapse_runs:
            return collapse_runs(units, mask)
        return units, mask

    # ----- files: the codebook defines the model's tokens, so a run saves it and can name one
    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / "centroids.npy", self.centroids.numpy())
        (directory / "units.json").write_text(
            json.dumps(asdict(self.settings) | {"size": self.size}, indent=1)
        )
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> UnitCodebook:
        directory = Path(directory)
        described = json.loads((directory / "units.json").read_text())
        size = described.pop("size")
        centroids = np.load(directory / "centroids.npy")
        if centroids.shape[0] != size:
            raise ValueError(
                f"{directory}: units.json says {size} units, centroids.npy holds {centroids.shape[0]}."
            )
        return cls(centroids, UnitSettings(**described))


def sample_frames(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], limit: int, seed: int = 0
) -> np.ndarray:
    """Up to ``limit`` real frames drawn uniformly from ``(frames, mask)`` batches (reservoir sampling)."""
    rng = np.random.default_rng(seed)
    reservoir: np.ndarray | None = None
    seen = 0
    for frames, mask in batches:
        real = frames[mask.bool()].detach().float().cpu().numpy()
        for row in real:
            if reservoir is None:
                reservoir = np.empty((limit, row.shape[0]), dtype=np.float32)
            if seen < limit:
                reservoir[seen] = row
            else:
                slot = rng.integers(0, seen + 1)
                if slot < limit:
                    reservoir[slot] = row
            seen += 1
    if reservoir is None:
        raise ValueError("no real frame to fit a codebook on.")
    return reservoir[: min(seen, limit)]


def fit_codebook(frames: np.ndarray, size: int, settings: UnitSettings, seed: int = 0) -> UnitCodebook:
    """k-means over training frames (``[N, D]``) with scikit-learn's ``MiniBatchKMeans``."""
    from sklearn.cluster import MiniBatchKMeans

    if len(frames) < size:
        raise ValueError(
            f"{len(frames)} frames cannot fit {size} units: sample at least as many frames as units."
        )
    kmeans = MiniBatchKMeans(n_clusters=size, random_state=seed, batch_size=max(1024, 4 * size), n_init=3)
    kmeans.fit(np.asarray(frames, dtype=np.float32))
    return UnitCodebook(kmeans.cluster_centers_, settings)
