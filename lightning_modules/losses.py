"""Contrastive losses over Matryoshka embedding dicts ``{dim: [B, dim]}``, as plain ``nn.Module``s.

A model takes one ``loss`` (``EmbeddingLoss``; a weighted sum of several is ``WeightedSum``) and
hands it a ``LossInputs``. Each loss declares in ``needs`` which embeddings it reads besides the
queries (``"documents"``, ``"transcriptions"``): the model computes only those, and the
datamodule reads from it whether every speech row must carry its transcription. The functions
below are the arithmetic; the modules hold the settings and gather across ranks through them.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import collectives
from errors import ConfigError
from lightning_modules.components.matryoshka import dims_side_by_side, split_dims
from lightning_modules.hard_negatives import HardNegatives, gather_with_negatives, negative_mask


def matryoshka_info_nce(
    query_embeddings: Mapping[int, torch.Tensor],
    document_embeddings: Mapping[int, torch.Tensor],
    temperature: float,
    weights: Mapping[int, float] | None = None,
    cross_device: bool = False,
    symmetric: bool = False,
    document_keys: torch.Tensor | None = None,
    negatives: HardNegatives | None = None,
    own_negatives_only: bool = False,
) -> torch.Tensor:
    """``sum_d w_d * CrossEntropy(cos(q_d, D_d) / temperature, arange(B))`` with in-batch negatives.

    Row ``i`` of the queries is paired with row ``i`` of the documents; every other document of
    the batch is a negative. Similarities are cosines (inputs are normalized here, a no-op for
    already unit-length embeddings) computed in float32 so bf16 autocast does not round logits.
    ``weights`` maps dim -> weight; missing dims weigh 1.

    ``cross_device`` (under ``torch.distributed``): the documents of every rank join the negatives
    (gathered with their gradients, see ``collectives.gather_with_grad``) and each rank scores its
    own queries against them: ``[local, global]`` logits, memory linear in the global batch.
    The local loss is scaled so that DDP's gradient averaging yields exactly the gradient of the
    mean over the global batch, even when ranks hold different numbers of rows.

    ``symmetric`` (CLIP-style): each dim's term is the mean of the query -> document cross-entropy
    and the document -> query one (each document must pick its own query among the batch's
    queries); under ``cross_device`` the queries of every rank are gathered as well.

    ``document_keys`` (``[B]`` integers, equal for identical documents): a copy of a row's own
    document elsewhere in the (global) batch is no negative for it: its logit is masked out, in
    both directions. Without keys every other column is a negative, as in sentence-transformers.

    ``negatives`` (hard negatives, ``lightning_modules.hard_negatives``): more columns after the
    (global) batch's documents, so row ``i``'s target stays ``offset + i``; gathered across ranks
    with their gradients like documents. A query sees every row's negatives (Tevatron,
    sentence-transformers), or with ``own_negatives_only`` only its own; a negative that is a copy
    of the query's own document (by key, whichever row listed it) is masked. The symmetric
    direction scores documents against queries only, over positives (as sentence-transformers'
    symmetric loss does). Without negatives (None, or none on any rank) the computation is the
    one above, unchanged.
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
    local_negatives = 0 if negatives is None else negatives.count
    all_negatives = negatives.normalized() if local_negatives else None
    distributed = cross_device and collectives.world_size() > 1
    if distributed:
        counts = collectives.gathered_counts((local_rows, local_negatives), documents[dims[0]].device)
        sizes = tuple(rows for rows, _ in counts)
        offset, global_rows = sum(sizes[: collectives.rank()]), sum(sizes)
        scale = local_rows * len(sizes) / global_rows  # local mean -> this rank's share of the global mean
    if distributed and any(count for _, count in counts):  # hard negatives on some rank
        all_documents, gathered_queries, all_keys, all_negatives = gather_with_negatives(
            documents, queries if symmetric else None, all_negatives, document_keys, counts
        )
        all_queries = gathered_queries if symmetric else all_queries
    elif distributed:
        # One collective for all dims (and both sides): columns side by side, split again after.
        local = dims_side_by_side(documents)
        if symmetric:
            local = torch.cat([local, dims_side_by_side(queries)], dim=1)
        gathered = collectives.gather_with_grad(local, sizes)
        width = sum(dims)
        all_documents = split_dims(gathered[:, :width], dims)
        if symmetric:
            all_queries = split_dims(gathered[:, width:], dims)
        if document_keys is not None:
            all_keys = collectives.gather_with_grad(document_keys, sizes)  # integers: no gradient
    elif document_keys is not None:
        all_keys = document_keys
    device = documents[dims[0]].device
    targets = torch.arange(offset, offset + local_rows, device=device)
    # [local, global]: True where a column holds a copy of the row's own document (not itself).
    false_negatives = None
    if document_keys is not None:
        false_negatives = document_keys.to(device)[:, None] == all_keys.to(device)[None, :]
        false_negatives[torch.arange(local_rows, device=device), targets] = False
    mask = false_negatives  # over every column the queries score
    if all_negatives is not None:
        hidden = negative_mask(all_negatives, targets, document_keys, own_negatives_only)
        if hidden is not None or false_negatives is not None:
            none = torch.zeros(local_rows, global_rows + all_negatives.count, dtype=torch.bool, device=device)
            on_documents = false_negatives if false_negatives is not None else none[:, :global_rows]
            on_negatives = hidden if hidden is not None else none[:, global_rows:]
            mask = torch.cat([on_documents, on_negatives], dim=1)
    total = None
    # Autocast would run the matmul in bf16 despite .float(): at temperature 0.05 that rounds
    # logits by ~0.06, so the similarities are computed with autocast off.
    with torch.autocast(device_type=device.type, enabled=False):
        for dim in dims:
            logits = queries[dim] @ all_documents[dim].T
            if all_negatives is not None:
                logits = torch.cat([logits, queries[dim] @ all_negatives.embeddings[dim].T], dim=1)
            term = F.cross_entropy(_masked(logits, mask) / temperature, targets)
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


@dataclass
class LossInputs:
    """What a loss scores: the batch's query embeddings and what its ``needs`` asked for."""

    queries: Mapping[int, torch.Tensor]
    documents: Mapping[int, torch.Tensor] | None = None
    # The frozen text tower's embedding of each query's transcription (alignment targets).
    transcriptions: Mapping[int, torch.Tensor] | None = None
    # [B] integers, equal for identical documents: a copy of a row's document is not its negative.
    document_keys: torch.Tensor | None = None
    # The batch's hard negatives (embedded with the documents), when its rows carry any.
    negatives: HardNegatives | None = None


class EmbeddingLoss(nn.Module):
    """A loss over Matryoshka embeddings; ``terms`` are its named parts, ``forward`` their sum."""

    needs: frozenset[str] = frozenset()

    def terms(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        return sum(self.terms(inputs).values())

    def min_rows(self) -> int:
        """Rows per rank a batch needs for the loss to mean anything (fewer: the step is skipped)."""
        return 1

    def check_dims(self, dims: Sequence[int]) -> None:
        """Raises ConfigError when a setting names a dim the model does not produce."""
        unknown = set(getattr(self, "dim_weights", {})) - set(dims)
        if unknown:
            raise ConfigError(
                f"model.loss: dim_weights names dims {sorted(unknown)} not in matryoshka_dims {list(dims)}."
            )

    def config(self) -> dict:
        """``{"class_path", "init_args"}`` as plain data: checkpoints rebuild the loss from it."""
        path = f"{type(self).__module__}.{type(self).__qualname__}"
        return {"class_path": path, "init_args": self.init_args}


def loss_from_config(config: Mapping) -> EmbeddingLoss:
    """The loss an ``EmbeddingLoss.config()`` describes (a checkpoint's hyperparameters)."""
    module, _, name = config["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**config.get("init_args", {}))


class MatryoshkaInfoNCE(EmbeddingLoss):
    """In-batch InfoNCE of queries against their documents, summed over dims (``matryoshka_info_nce``)."""

    needs = frozenset({"documents"})

    def __init__(
        self,
        temperature: float = 0.05,
        dim_weights: dict[int, float] | None = None,
        symmetric: bool = False,
        cross_device_negatives: bool = True,
        own_negatives_only: bool = False,
    ):
        """
        Args:
            temperature: Softmax temperature on cosine similarities.
            dim_weights: Optional weight per dim in the sum (missing dims weigh 1).
            symmetric: Also score each document against the batch's queries (CLIP-style: the mean
                of both directions per dim); false: queries -> documents only.
            cross_device_negatives: Under DDP, every rank's documents are negatives for every
                query (global batch); false: each rank contrasts its own batch only.
            own_negatives_only: With hard negatives in the data (``data.num_negatives``): each
                query sees only its own row's negatives; false: every row's negatives in the
                (global) batch, as Tevatron and sentence-transformers do. In-batch documents are
                negatives either way.
        """
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"model.loss.temperature must be > 0, got {temperature}.")
        self.temperature = temperature
        self.dim_weights = {int(dim): weight for dim, weight in (dim_weights or {}).items()}
        self.symmetric = symmetric
        self.cross_device_negatives = cross_device_negatives
        self.own_negatives_only = own_negatives_only
        self.init_args = {
            "temperature": temperature,
            "dim_weights": self.dim_weights,
            "symmetric": symmetric,
            "cross_device_negatives": cross_device_negatives,
            "own_negatives_only": own_negatives_only,
        }

    def min_rows(self) -> int:
        # Alone on its rank a row still has the other ranks' documents as negatives.
        return 1 if self.cross_device_negatives and collectives.world_size() > 1 else 2

    def terms(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        loss = matryoshka_info_nce(
            inputs.queries,
            inputs.documents,
            self.temperature,
            self.dim_weights,
            self.cross_device_negatives,
            symmetric=self.symmetric,
            document_keys=inputs.document_keys,
            negatives=inputs.negatives,
            own_negatives_only=self.own_negatives_only,
        )
        return {"info_nce": loss}


class DimWeightedLoss(EmbeddingLoss):
    """A loss whose one setting is a weight per dim."""

    def __init__(self, dim_weights: dict[int, float] | None = None):
        """
        Args:
            dim_weights: Optional weight per dim in the sum (missing dims weigh 1).
        """
        super().__init__()
        self.dim_weights = {int(dim): weight for dim, weight in (dim_weights or {}).items()}
        self.init_args = {"dim_weights": self.dim_weights}


class TranscriptionAlignment(DimWeightedLoss):
    """Pulls each speech query towards the text tower's embedding of its transcription (cosine + L1)."""

    needs = frozenset({"transcriptions"})

    def terms(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        loss = matryoshka_alignment_loss(inputs.queries, inputs.transcriptions, self.dim_weights)
        return {"alignment": loss}


class SpreadOut(DimWeightedLoss):
    """Global orthogonal regularization (Zhang et al. 2017, "Learning Spread-out Local Feature
    Descriptors"), the regulariser the unit-fusion paper adds: non-matching query-document pairs
    should look like independent random unit vectors, whose dot products have mean 0 and second
    moment 1/d in d dims. Per dim: ``mean(s)^2 + max(0, mean(s^2) - 1/d)`` over the cosines ``s``
    of every pair (i, j != i) in the batch (this rank's), summed over dims. Use it inside a
    ``WeightedSum`` beside InfoNCE."""

    needs = frozenset({"documents"})

    def min_rows(self) -> int:
        return 2

    def terms(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        total = None
        for dim in sorted(inputs.queries):
            queries = F.normalize(inputs.queries[dim].float(), dim=-1)
            documents = F.normalize(inputs.documents[dim].float(), dim=-1)
            with torch.autocast(device_type=queries.device.type, enabled=False):
                cosines = queries @ documents.T
            rows = cosines.shape[0]
            off_diagonal = cosines[~torch.eye(rows, dtype=torch.bool, device=cosines.device)]
            if inputs.document_keys is not None:  # a copy of a row's own document is not a pair to spread
                keys = inputs.document_keys.to(cosines.device)
                same = (keys[:, None] == keys[None, :])[
                    ~torch.eye(rows, dtype=torch.bool, device=cosines.device)
                ]
                off_diagonal = off_diagonal[~same]
            if off_diagonal.numel() == 0:
                continue
            term = off_diagonal.mean() ** 2 + F.relu(off_diagonal.pow(2).mean() - 1.0 / dim)
            term = self.dim_weights.get(dim, 1.0) * term
            total = term if total is None else total + term
        if total is None:
            total = inputs.queries[min(inputs.queries)].sum() * 0.0
        return {"spread_out": total}


class WeightedSum(EmbeddingLoss):
    """``sum_i weight_i * loss_i``: e.g. InfoNCE plus transcription alignment."""

    def __init__(self, losses: list[EmbeddingLoss], weights: list[float] | None = None):
        """
        Args:
            losses: The terms (each an ``EmbeddingLoss``).
            weights: One weight per term (default 1 each).
        """
        super().__init__()
        losses = [loss_from_config(loss) if isinstance(loss, Mapping) else loss for loss in losses]
        weights = [1.0] * len(losses) if weights is None else list(weights)
        if not losses or len(weights) != len(losses):
            raise ConfigError(
                f"model.loss: WeightedSum needs one weight per loss, got {len(weights)} for {len(losses)}."
            )
        if any(weight < 0 for weight in weights):
            raise ConfigError(f"model.loss: WeightedSum weights must be >= 0, got {weights}.")
        self.losses = nn.ModuleList(losses)
        self.weights = weights
        self.needs = frozenset().union(*(loss.needs for loss in losses))
        self.init_args = {"losses": [loss.config() for loss in losses], "weights": weights}

    def min_rows(self) -> int:
        return max(loss.min_rows() for loss in self.losses)

    def check_dims(self, dims: Sequence[int]) -> None:
        for loss in self.losses:
            loss.check_dims(dims)

    def terms(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for loss, weight in zip(self.losses, self.weights, strict=True):
            for name, value in loss.terms(inputs).items():
                out[name if name not in out else f"{name}_{len(out)}"] = weight * value
        return out
