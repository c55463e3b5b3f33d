"""Matryoshka dims: validation and slicing (plain torch, no Lightning)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from errors import ConfigError


def validate_matryoshka_dims(dims: Sequence[int], max_dim: int | None = None) -> list[int]:
    """Returns the dims as a list, or raises a ValueError that says how to fix them."""
    dims = list(dims)
    if not dims:
        raise ConfigError(
            "model.matryoshka_dims is empty: give at least one dim, e.g. [128, 256, 512, 1024]."
        )
    if any(not isinstance(d, int) or isinstance(d, bool) or d <= 0 for d in dims):
        raise ConfigError(f"model.matryoshka_dims must be positive integers, got {dims}.")
    if len(set(dims)) != len(dims):
        raise ConfigError(f"model.matryoshka_dims has duplicates: {dims}; list each dim once.")
    if dims != sorted(dims):
        raise ConfigError(f"model.matryoshka_dims must be sorted ascending, got {dims}; use {sorted(dims)}.")
    if max_dim is not None and dims[-1] > max_dim:
        raise ConfigError(
            f"model.matryoshka_dims {dims} has {dims[-1]} > the embedding size {max_dim} of the model; "
            f"the largest dim must be at most {max_dim}."
        )
    return dims


def matryoshka_slices(embedding: torch.Tensor, dims: Sequence[int]) -> dict[int, torch.Tensor]:
    """``{d: normalize(embedding[:, :d])}``: each prefix re-normalized to unit length, in float32."""
    embedding = embedding.float()
    return {d: F.normalize(embedding[:, :d], dim=-1) for d in dims}


def key_width(key: int | tuple[int, int]) -> int:
    """The width of an embedding key: ``dim``, or ``(layer, dim)`` for an early exit."""
    return key[1] if isinstance(key, tuple) else key


def ordered_keys(embeddings: Mapping) -> list:
    """The keys of an embedding dict in one fixed order: full-depth dims ascending, then the exits'
    ``(layer, dim)`` ascending (``components/early_exit.py``)."""
    return sorted(embeddings, key=lambda key: (1, *key) if isinstance(key, tuple) else (0, 0, key))


def dims_side_by_side(embeddings: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """``{d: [B, d]}`` as one ``[B, sum(dims)]`` tensor, dims ascending: one collective, copy or row.
    Exit keys ``(layer, dim)`` come after the full-depth dims (``ordered_keys``)."""
    return torch.cat([embeddings[d] for d in ordered_keys(embeddings)], dim=1)


def split_dims(side_by_side: torch.Tensor, dims: Sequence) -> dict[int, torch.Tensor]:
    """The inverse of ``dims_side_by_side`` for keys in ``ordered_keys`` order."""
    widths = [key_width(key) for key in dims]
    return dict(zip(dims, side_by_side.split(widths, dim=1), strict=True))


class MatryoshkaHeads(nn.Module):
    """One ``Linear`` per Matryoshka dim (the dual encoders' heads): ``[B, H] -> {d: unit [B, d]}``.

    Unlike a sliced embedding, the outputs are not nested prefixes of one vector: each dim has its
    own projection, trained against the matching slice of the text embedding.
    """

    def __init__(self, input_size: int, dims: Sequence[int]):
        super().__init__()
        self.dims = validate_matryoshka_dims(dims)
        self.heads = nn.ModuleDict({str(d): nn.Linear(input_size, d) for d in self.dims})

    def forward(self, pooled: torch.Tensor) -> dict[int, torch.Tensor]:
        return {d: F.normalize(self.heads[str(d)](pooled).float(), dim=-1) for d in self.dims}
