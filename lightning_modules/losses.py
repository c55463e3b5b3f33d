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
