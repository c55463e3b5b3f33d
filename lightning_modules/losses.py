"""Contrastive losses over Matryoshka embedding dicts ``{dim: [B, dim]}``."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from lightning_modules import distributed
from lightning_modules.components.matryoshka import dims_side_by_side, split_dims


def matryoshka_info_nce(
    query_embeddings: Mapping[int, torch.Tensor],
    document_embeddings: Mapping[int, torch.Tensor],
    temperature: float,
    weights: Mapping[int, float] | None = None,
    cross_device: bool = False,
    symmetric: bool = False,
    document_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_d w_d * CrossEntropy(cos(q_d, D_d) / temperature, arange(B))`` with in-batch negatives.

    Row ``i`` of the queries is paired with row ``i`` of the documents; every other document of
    the batch is a negative. Similarities are cosines (inputs are normalized here, a no-op for
    already unit-length embeddings) computed in float32 so bf16 autocast does not round logits.
    ``weights`` maps dim -> weight; missing dims weigh 1.

    ``cross_device`` (under ``torch.distributed``): the documents of every rank join the negatives
    (gathered with their gradients, see ``distributed.gather_with_grad``) and each rank scores its
    own queries against them: ``[local, global]`` logits, memory linear in the global batch.
    The local loss is scaled so that DDP's gradient averaging yields exactly the gradient of the
    mean over the global batch, even when ranks hold different numbers of rows.

    ``symmetric`` (CLIP-style): each dim's term is the mean of the query -> document cross-entropy
    and the document -> query one (each document must pick its own query among the batch's
    queries); under ``cross_device`` the queries of every rank are gathered as well.

    ``document_keys`` (``[B]`` integers, equal for identical documents): a copy of a row's own
    document elsewhere in the (global) batch is no negative for it: its logit is masked out, in
    both directions. Without keys every other column is a negative, as in sentence-transformers.
    """
    if set(query_embeddings) != set(document_embeddings):
        raise ValueError(
            f"query dims {sorted(query_embeddings)} and document dims {sorted(document_embeddings)} differ."
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    dims = sorted(query_embeddings)
    if not dims:
        raise ValueError("matryoshka_info_nce got no dims.")
    for dim in dims:
        if query_embeddings[dim].shape[0] != document_embeddings[dim].shape[0]:
            raise ValueError(
                f"dim {dim}: {query_embeddings[dim].shape[0]} queries but "
                f"{document_embeddings[dim].shape[0]} documents."
            )
    weights = weights or {}
    local_rows = query_embeddings[dims[0]].shape[0]
    queries = {dim: F.normalize(query_embeddings[dim].float(), dim=-1) for dim in dims}
    documents = {dim: F.normalize(document_embeddings[dim].float(), dim=-1) for dim in dims}
    all_queries, all_documents = queries, documents  # the candidates each side is scored against
    offset, global_rows, scale = 0, local_rows, 1.0
    if cross_device and distributed.world_size() > 1:
        sizes = distributed.gathered_sizes(local_rows, documents[dims[0]].device)
        # One collective for all dims (and both sides): columns side by side, split again after.
        local = dims_side_by_side(documents)
        if symmetric:
            local = torch.cat([local, dims_side_by_side(queries)], dim=1)
        gathered = distributed.gather_with_grad(local, sizes)
        width = sum(dims)
        all_documents = split_dims(gathered[:, :width], dims)
        if symmetric:
            all_queries = split_dims(gathered[:, width:], dims)
        offset, global_rows = sum(sizes[: distributed.rank()]), sum(sizes)
        scale = local_rows * len(sizes) / global_rows  # local mean -> this rank's share of the global mean
        if document_keys is not None:
            all_keys = distributed.gather_with_grad(document_keys, sizes)  # integers: no gradient
    elif document_keys is not None:
        all_keys = document_keys
    device = documents[dims[0]].device
    targets = torch.arange(offset, offset + local_rows, device=device)
    # [local, global]: True where a column holds a copy of the row's own document (not itself).
    false_negatives = None
    if document_keys is not None:
        false_negatives = document_keys.to(device)[:, None] == all_keys.to(device)[None, :]
        false_negatives[torch.arange(local_rows, device=device), targets] = False
    total = None
    # Autocast would run the matmul in bf16 despite .float(): at temperature 0.05 that rounds
    # logits by ~0.06, so the similarities are computed with autocast off.
    with torch.autocast(device_type=device.type, enabled=False):
        for dim in dims:
            term = F.cross_entropy(
                _masked(queries[dim] @ all_documents[dim].T, false_negatives) / temperature, targets
            )
            if symmetric:
                # Document i against query j: j's document is a copy of i exactly when i's is of j's.
                logits = _masked(documents[dim] @ all_queries[dim].T, false_negatives)
                reverse = F.cross_entropy(logits / temperature, targets)
                term = (term + reverse) / 2
            term = weights.get(dim, 1.0) * term
            total = term if total is None else total + term
    return total * scale if scale != 1.0 else total


def _masked(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return logits if mask is None else logits.masked_fill(mask, float("-inf"))


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
