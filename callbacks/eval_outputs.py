"""What eval steps return, filed, gathered across ranks and put back in row order.

``validation_step``, ``test_step`` and ``predict_step`` return one dict per eval batch
(``eval_set``, ``side``, ``index``: row positions, ``embeddings``: ``{dim: [B, dim]}``); the
evaluator and the embedding writer both collect them here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.distributed as dist

TRANSCRIPTS = "transcripts"
"""The key transcripts are filed under, beside the sides: ``(eval set, "transcripts")``."""


def add_eval_output(chunks: dict[tuple[str, str], list], outputs) -> None:
    """Files one eval batch's embeddings (an ``evaluation_step`` output) under (eval set, side),
    and the transcripts of a model that transcribes its queries under (eval set, "transcripts")."""
    if not isinstance(outputs, dict):
        return
    if "embeddings" in outputs:
        chunks[(outputs["eval_set"], outputs["side"])].append((outputs["index"], outputs["embeddings"]))
    if TRANSCRIPTS in outputs:
        chunks[(outputs["eval_set"], TRANSCRIPTS)].append((outputs["index"], outputs[TRANSCRIPTS]))


def assemble_transcripts(chunks: list[tuple[torch.Tensor, list[str]]], size: int) -> list[str] | None:
    """Per-batch transcripts put at their rows' positions; None if some row never arrived."""
    if not chunks:
        return None
    rows: list[str | None] = [None] * size
    for index, texts in chunks:
        for position, text in zip(index.tolist(), texts, strict=True):
            rows[position] = text
    return None if any(text is None for text in rows) else rows


def assemble(
    chunks: list[tuple[torch.Tensor, dict[int, torch.Tensor]]], size: int, dims: Sequence[int]
) -> dict[int, torch.Tensor] | None:
    """Places per-batch embeddings at their positions; None if some position never arrived.

    A side of zero rows is complete: a ``[0, dim]`` tensor per dim (a corpus without queries yet).
    """
    if size == 0:
        return {dim: torch.zeros(0, dim) for dim in dims}
    if not chunks:
        return None
    seen = torch.zeros(size, dtype=torch.bool)
    out: dict[int, torch.Tensor] = {}
    for index, embeddings in chunks:
        seen[index] = True
        for dim, values in embeddings.items():
            if dim not in out:
                out[dim] = torch.zeros(size, values.shape[1], dtype=values.dtype)
            out[dim][index] = values
    return out if bool(seen.all()) else None


def chunks_of_all_ranks(trainer, chunks: dict[tuple[str, str], list]) -> dict[tuple[str, str], list] | None:
    """Every rank's encoded batches, keyed by (eval set, side), on rank 0 (None on the other ranks)."""
    if trainer.world_size == 1:
        return chunks
    shares = [None] * trainer.world_size if trainer.is_global_zero else None
    dist.gather_object(dict(chunks), shares, dst=0)
    if not trainer.is_global_zero:
        return None
    merged = defaultdict(list)
    for share in shares:
        for key, values in share.items():
            merged[key].extend(values)
    return merged
