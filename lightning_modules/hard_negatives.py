"""Hard negatives in the loss: embedded with the documents, gathered across ranks with them.

A batch with hard negatives carries ``negatives`` (the negative documents of all its rows,
tokenized in one call with ``document``, so both have the same width), ``negative_rows`` (``[N]``:
the batch row, i.e. the query, each negative was sampled for) and ``negative_keys`` (``[N]``
document keys, as ``document_keys``). The model embeds documents and negatives in one document
pass (``embed_documents_and_negatives``): GradCache chunks and the frozen-document cache serve
negatives exactly as documents.

The loss's candidates are laid out ``[every rank's documents | every rank's negatives]``, so the
target of local row ``i`` stays ``offset + i`` whatever the ranks' row and negative counts. The
sentence-transformers bug fixed in PR #3453 interleaved ``[documents_r0, negatives_r0,
documents_r1, ...]`` after gathering and then pointed labels at the wrong columns.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import collectives
from lightning_modules.components.matryoshka import dims_side_by_side, split_dims
from lightning_modules.grad_cache import chunked_embeddings


@dataclass
class HardNegatives:
    """Negative documents of a batch's rows: their embeddings, whose row each one is, their keys."""

    embeddings: Mapping[int, torch.Tensor]
    """``{dim: [N, dim]}``."""
    rows: torch.Tensor
    """``[N]`` long: the row (query) each negative belongs to; global row indices after gathering."""
    keys: torch.Tensor | None = None
    """``[N]`` int64 document keys (equal for identical documents): a negative that is a copy of a
    query's own document is masked for that query."""

    @property
    def count(self) -> int:
        return int(self.rows.shape[0])

    def normalized(self) -> HardNegatives:
        embeddings = {dim: F.normalize(value.float(), dim=-1) for dim, value in self.embeddings.items()}
        return HardNegatives(embeddings, self.rows, self.keys)


def embed_documents_and_negatives(
    embed: Callable[[Mapping], Mapping[int, torch.Tensor]],
    batch: Mapping,
    chunk_size: int | None,
    parameters: list[torch.Tensor] | None,
) -> tuple[dict[int, torch.Tensor], HardNegatives | None]:
    """The batch's document embeddings and, when it carries any, its hard negatives', from one
    document pass (``chunked_embeddings``: whole or in GradCache chunks over documents and negatives
    alike). Without negatives this is ``chunked_embeddings(embed, batch, ...)`` itself."""
    negatives = batch.get("negatives")
    if negatives is None or negatives["input_ids"].shape[0] == 0:
        return chunked_embeddings(embed, batch, chunk_size, parameters), None
    documents = batch["document"]
    if negatives["input_ids"].shape[1] != documents["input_ids"].shape[1]:
        raise ValueError(
            f"negatives are {negatives['input_ids'].shape[1]} tokens wide but documents "
            f"{documents['input_ids'].shape[1]}: tokenize them in one call (TextBatchBuilder does)."
        )
    rows, count = documents["input_ids"].shape[0], negatives["input_ids"].shape[0]
    joint = {key: torch.cat([documents[key], negatives[key]]) for key in documents}
    ids = [*batch["ids"], *(f"negative {i}" for i in range(count))]
    embedded = chunked_embeddings(embed, {"ids": ids, "document": joint}, chunk_size, parameters)
    keys = batch.get("negative_keys")
    if keys is None:  # a batch built otherwise; imported here: the loss side stays free of Lightning
        from lightning_modules.document_cache import tokenized_document_keys

        keys = tokenized_document_keys(negatives)
    device = next(iter(embedded.values())).device
    hard = HardNegatives(
        {dim: value[rows:] for dim, value in embedded.items()},
        batch["negative_rows"].to(device),
        keys.to(device),
    )
    return {dim: value[:rows] for dim, value in embedded.items()}, hard


def negative_mask(
    negatives: HardNegatives,
    global_rows: torch.Tensor,
    row_keys: torch.Tensor | None,
    own_negatives_only: bool,
) -> torch.Tensor | None:
    """``[local rows, N]``: True where a query must not see a negative: a copy of the query's own
    document (a false negative, whichever row listed it), or, with ``own_negatives_only``, another
    row's negative. ``global_rows``: each local query's row in the (global) batch."""
    mask = None
    if row_keys is not None and negatives.keys is not None:
        mask = row_keys.to(negatives.keys.device)[:, None] == negatives.keys[None, :]
    if own_negatives_only:
        others = negatives.rows[None, :] != global_rows[:, None]
        mask = others if mask is None else mask | others
    return mask


def gather_with_negatives(
    documents: Mapping[int, torch.Tensor],
    queries: Mapping[int, torch.Tensor] | None,
    negatives: HardNegatives | None,
    document_keys: torch.Tensor | None,
    counts: list[tuple[int, int]],
):
    """Every rank's documents (and queries, for the symmetric loss), negatives and keys, with
    gradients, in one collective for the embeddings and one for the integers.

    ``counts``: each rank's ``(rows, negatives)``. Returns ``(all_documents, all_queries,
    all_keys, all_negatives)``; ``all_negatives.rows`` are global row indices.
    """
    dims = sorted(documents)
    width = sum(dims)
    local_documents = dims_side_by_side(documents)
    device = local_documents.device
    rows = local_documents.shape[0]
    count = 0 if negatives is None else negatives.count
    local = torch.cat(
        [
            local_documents,
            dims_side_by_side(negatives.embeddings) if count else local_documents.new_zeros((0, width)),
        ]
    )
    if queries is not None:  # queries beside their documents; the negatives' rows hold zeros
        local = torch.cat([local, F.pad(dims_side_by_side(queries), (0, 0, 0, count))], dim=1)
    totals = tuple(r + n for r, n in counts)
    gathered = collectives.gather_with_grad(local, totals)
    # Where each rank's documents and negatives sit in the gathered rows.
    starts = [sum(totals[:r]) for r in range(len(counts))]
    document_index = torch.cat(
        [torch.arange(s, s + r, device=device) for s, (r, _) in zip(starts, counts, strict=True)]
    )
    negative_index = torch.cat(
        [torch.arange(s + r, s + r + n, device=device) for s, (r, n) in zip(starts, counts, strict=True)]
    )
    all_documents = split_dims(gathered[document_index, :width], dims)
    all_queries = split_dims(gathered[document_index, width:], dims) if queries is not None else None
    # Integers (no gradient): each row's document key, each negative's key and global row.
    offset = sum(r for r, _ in counts[: collectives.rank()])
    no_rows = torch.zeros(rows, dtype=torch.long, device=device)
    no_negatives = torch.zeros(count, dtype=torch.long, device=device)
    row_keys = document_keys.to(device) if document_keys is not None else no_rows
    has_negative_keys = count and negatives.keys is not None
    negative_keys = negatives.keys.to(device) if has_negative_keys else no_negatives
    owners = negatives.rows.to(device) + offset if count else no_negatives
    integers = torch.stack([torch.cat([row_keys, negative_keys]), torch.cat([no_rows, owners])], dim=1)
    gathered_integers = collectives.gather_with_grad(integers, totals)
    all_keys = gathered_integers[document_index, 0] if document_keys is not None else None
    all_negatives = HardNegatives(
        split_dims(gathered[negative_index, :width], dims),
        gathered_integers[negative_index, 1],
        gathered_integers[negative_index, 0],
    )
    return all_documents, all_queries, all_keys, all_negatives
