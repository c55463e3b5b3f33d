"""Retrieval evaluation at every validation/test: nDCG, Recall and MRR per eval set and Matryoshka dim.

The LightningModule's ``validation_step`` embeds each eval batch once (every dim from one pass)
and returns the embeddings with their positions; this callback gathers them per eval set,
ranks the corpus with an exact chunked top-k, and logs one scalar per (eval set, metric, dim),
e.g. ``val/demo/ndcg@10/d256``. The assembled embeddings stay available to other analyses as
``last_embeddings`` so nothing is encoded twice.

Under DDP each rank encodes its share of every eval set (Lightning's distributed sampler); the
shares are gathered on rank 0, which scores the full set once and broadcasts the numbers, so
every rank logs (and ModelCheckpoint monitors) the same values. ``last_embeddings`` is filled
on rank 0 only.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer

from callbacks.metrics import metrics_from_ranking, top_k_search

log = logging.getLogger(__name__)


def assemble(
    chunks: list[tuple[torch.Tensor, dict[int, torch.Tensor]]], size: int
) -> dict[int, torch.Tensor] | None:
    """Places per-batch embeddings at their positions; None if some position never arrived."""
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


class RetrievalEvaluator(Callback):
    """Logs ``{stage}/{eval_set}/{metric}@{k}/d{dim}`` for every eval set of the datamodule."""

    def __init__(
        self, ks: Sequence[int] = (5, 10), query_chunk_size: int = 1024, document_chunk_size: int = 16384
    ):
        """
        Args:
            ks: Cut-offs of nDCG, Recall and MRR.
            query_chunk_size: Queries scored at once (memory ~ query_chunk x document_chunk floats).
            document_chunk_size: Documents scored at once.
        """
        self.ks = tuple(sorted(ks))
        self.query_chunk_size = query_chunk_size
        self.document_chunk_size = document_chunk_size
        self._chunks: dict[tuple[str, str], list] = defaultdict(list)
        self.last_embeddings: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
        self.last_metrics: dict[str, float] = {}

    # ----- collection ---------------------------------------------------------------------
    def _reset(self, *args) -> None:
        self._chunks = defaultdict(list)

    on_validation_epoch_start = _reset
    on_test_epoch_start = _reset

    def _collect(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if isinstance(outputs, dict) and "embeddings" in outputs:
            self._chunks[(outputs["eval_set"], outputs["side"])].append(
                (outputs["index"], outputs["embeddings"])
            )

    on_validation_batch_end = _collect
    on_test_batch_end = _collect

    # ----- scoring ------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._evaluate(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._evaluate(trainer, pl_module, "test")

    def _chunks_of_all_ranks(self, trainer: Trainer) -> dict[tuple[str, str], list] | None:
        """Every rank's encoded batches on rank 0 (None on the other ranks)."""
        if trainer.world_size == 1:
            return self._chunks
        shares = [None] * trainer.world_size if trainer.is_global_zero else None
        dist.gather_object(dict(self._chunks), shares, dst=0)
        if not trainer.is_global_zero:
            return None
        merged = defaultdict(list)
        for share in shares:
            for key, chunks in share.items():
                merged[key].extend(chunks)
        return merged

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.last_embeddings, self.last_metrics = {}, {}
        chunks = self._chunks_of_all_ranks(trainer)
        if chunks is not None:
            self._score(trainer, chunks, stage)
        if trainer.world_size > 1:
            self.last_metrics = trainer.strategy.broadcast(self.last_metrics, src=0)
        for tag, value in self.last_metrics.items():
            # Identical on every rank after the broadcast; sync_dist keeps Lightning's DDP check quiet.
            pl_module.log(tag, value, add_dataloader_idx=False, batch_size=1, sync_dist=True)
        self._chunks = defaultdict(list)

    def _score(self, trainer: Trainer, chunks: dict[tuple[str, str], list], stage: str) -> None:
        eval_sets = getattr(trainer.datamodule, "eval_sets", {}) if trainer.datamodule is not None else {}
        for name, eval_set in eval_sets.items():
            queries = assemble(chunks.get((name, "queries"), []), len(eval_set.queries))
            corpus = assemble(chunks.get((name, "corpus"), []), len(eval_set.corpus))
            if queries is None or corpus is None:
                log.warning(
                    "eval set %s was not fully encoded (limit_%s_batches?): no metrics this time.",
                    name,
                    stage,
                )
                continue
            self.last_embeddings[name] = {"queries": queries, "corpus": corpus}
            for dim in sorted(queries):
                _, ranked = top_k_search(
                    queries[dim], corpus[dim], max(self.ks), self.query_chunk_size, self.document_chunk_size
                )
                results = metrics_from_ranking(ranked, eval_set.qrels, self.ks)
                for metric in (f"{m}@{k}" for m in ("ndcg", "recall", "mrr") for k in self.ks):
                    self.last_metrics[f"{stage}/{name}/{metric}/d{dim}"] = results[metric]
            self.last_metrics[f"{stage}/{name}/num_queries_evaluated"] = results["num_queries"]
