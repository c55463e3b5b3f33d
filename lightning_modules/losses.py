"""Contrastive losses over Matryoshka embedding dicts ``{dim: [B, dim]}``."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F


def matryoshka_info_nce(
    query_embeddings: Mapping[int, torch.Tensor],
    document_embeddings: Mapping[int, torch.Tensor],
    temperature: float,
    weights: Mapping[int, float] | None = None,
) -> torch.Tensor:
    """``sum_d w_d * CrossEntropy(cos(q_d, D_d) / temperature, arange(B))`` with in-batch negatives.

    Row ``i`` of the queries is paired with row ``i`` of the documents; every other document of
    the batch is a negative. Similarities are cosines (inputs are normalized here, a no-op for
    already unit-length embeddings) computed in float32 so bf16 autocast does not round logits.
    ``weights`` maps dim -> weight; missing dims weigh 1.
    """
    if set(query_embeddings) != set(document_embeddings):
        raise ValueError(
            f"query dims {sorted(query_embeddings)} and document dims {sorted(document_embeddings)} differ."
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    weights = weights or {}
    total = None
    for dim in sorted(query_embeddings):
        queries = F.normalize(query_embeddings[dim].float(), dim=-1)
        documents = F.normalize(document_embeddings[dim].float(), dim=-1)
        if queries.shape[0] != documents.shape[0]:
            raise ValueError(f"dim {dim}: {queries.shape[0]} queries but {documents.shape[0]} documents.")
        logits = queries @ documents.T / temperature
        targets = torch.arange(queries.shape[0], device=logits.device)
        term = weights.get(dim, 1.0) * F.cross_entropy(logits, targets)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("matryoshka_info_nce got no dims.")
    return total


def matryoshka_alignment_loss(
    query_embeddings: Mapping[int, torch.Tensor],
    target_embeddings: Mapping[int, torch.Tensor],
    weights: Mapping[int, float] | None = None,
) -> torch.Tensor:
    """``sum_d w_d * mean_i [(1 - cos(q_i, t_i)) + mean_k |q_ik - t_ik|]`` on unit-length vectors.

    Distils target embeddings (the frozen text tower's embedding of each query's transcription)
    into the query embeddings, dim by dim. Zero exactly when every query equals its target;
    targets are detached, so no gradient reaches the tower that made them.
    """
    if set(query_embeddings) != set(target_embeddings):
        raise ValueError(
            f"query dims {sorted(query_embeddings)} and target dims {sorted(target_embeddings)} differ."
        )
    weights = weights or {}
    total = None
    for dim in sorted(query_embeddings):
        queries = F.normalize(query_embeddings[dim].float(), dim=-1)
        targets = F.normalize(target_embeddings[dim].detach().float(), dim=-1)
        if queries.shape != targets.shape:
            raise ValueError(f"dim {dim}: queries {tuple(queries.shape)} but targets {tuple(targets.shape)}.")
        cosine = (1 - (queries * targets).sum(dim=-1)).mean()
        l1 = (queries - targets).abs().mean()
        term = weights.get(dim, 1.0) * (cosine + l1)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("matryoshka_alignment_loss got no dims.")
    return total
