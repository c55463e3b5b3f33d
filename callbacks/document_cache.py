"""Embeds every document once with the frozen document tower; training and evaluation read them.

At the start of fit (or of a validate/test run) the distinct documents of the training data and
of the eval corpora are tokenized as batches tokenize them, the ones the cache lacks are embedded
(each rank takes every world_size-th document and writes its own part), and the model reads
document embeddings from the cache from then on (``MatryoshkaEmbedder.document_embeddings``). A
document the cache lacks (data that changed mid-run) is embedded by the model, so the loss is the
one without the cache; ``train/document_cache_misses`` counts them.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback

from errors import ConfigError
from lightning_modules.components.matryoshka import dims_side_by_side
from lightning_modules.document_cache import DocumentEmbeddingCache, token_keys, tower_fingerprint

log = logging.getLogger(__name__)

FLUSH_ROWS = 65_536  # rows held in memory before a part is written


class CacheFrozenDocuments(Callback):
    """Computes frozen document embeddings once, stores them under ``directory/<fingerprint>/``."""

    def __init__(self, directory: str = "cache/document_embeddings", batch_size: int = 64):
        """
        Args:
            directory: Root of the cache; one sub-folder per model fingerprint (frozen document
                weights, model class, dims, precision), reused by later runs of the same model.
            batch_size: Documents per forward pass while filling the cache.
        """
        self.directory = Path(directory)
        self.batch_size = batch_size

    def on_fit_start(self, trainer, pl_module) -> None:
        self._attach(trainer, pl_module, include_training=True)

    def on_validation_start(self, trainer, pl_module) -> None:
        if pl_module.document_cache is None:
            self._attach(trainer, pl_module, include_training=False)

    def on_test_start(self, trainer, pl_module) -> None:
        if pl_module.document_cache is None:
            self._attach(trainer, pl_module, include_training=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.document_cache is not None:
            pl_module.log("train/document_cache_misses", float(pl_module.document_cache.misses), batch_size=1)

    def _attach(self, trainer, pl_module, include_training: bool) -> None:
        if not pl_module.document_tower_frozen:
            raise ConfigError(
                f"CacheFrozenDocuments: the document embeddings of {type(pl_module).__name__} change "
                "while it trains (a trainable text tower, or LoRA adapters on documents). Remove the "
                "callback, or freeze the document path (LateFusion: freeze_text_encoder without "
                "lora, or adapt_documents: false)."
            )
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "distinct_documents"):
            raise ConfigError("CacheFrozenDocuments needs the StreamingPairDataModule (data: ...).")
        tower = pl_module.document_tower()
        settings = [
            type(pl_module).__name__,
            repr(getattr(tower, "config", None)),
            f"dims={pl_module.matryoshka_dims}",
            f"precision={trainer.precision}",
        ]
        started = time.perf_counter()
        cache = DocumentEmbeddingCache(
            self.directory / tower_fingerprint(tower, settings), pl_module.matryoshka_dims
        )
        texts = list(datamodule.distinct_documents(include_training))
        mine = texts[trainer.global_rank :: trainer.world_size]
        computed = fill_cache(
            cache,
            pl_module,
            datamodule.tokenize_documents,
            mine,
            self.batch_size,
            trainer.precision_plugin.forward_context,
            part_prefix=f"rank{trainer.global_rank}",
        )
        trainer.strategy.barrier("document_cache_filled")
        cache.reload()
        cache.hits = cache.misses = 0
        pl_module.document_cache = cache
        log.info(
            "document cache %s: %d documents, %d computed by this rank in %.1f s",
            cache.directory,
            len(cache),
            computed,
            time.perf_counter() - started,
        )


@torch.no_grad()
def fill_cache(
    cache: DocumentEmbeddingCache,
    model,
    tokenize: Callable[[list[str]], dict],
    texts: list[str],
    batch_size: int = 64,
    forward_context: Callable = contextlib.nullcontext,
    part_prefix: str = "rank0",
) -> int:
    """Embeds the ``texts`` the cache lacks with ``model.embed_documents``; returns how many."""
    # Longest first: similar lengths share a batch, so padding stays small.
    texts = sorted(texts, key=len, reverse=True)
    pending_keys, pending_rows, seen, computed = [], [], set(), 0

    def write():
        name = f"{part_prefix}-{uuid.uuid4().hex[:12]}"
        cache.add(np.concatenate(pending_keys), np.concatenate(pending_rows), name=name)
        pending_keys.clear()
        pending_rows.clear()

    for start in range(0, len(texts), batch_size):
        tokens = tokenize(texts[start : start + batch_size])
        keys = token_keys(tokens["input_ids"], tokens["attention_mask"])
        # New to the cache and to this pass (two texts can tokenize alike after truncation).
        new = (cache.find(keys) < 0) & np.array([key not in seen for key in keys.tolist()])
        seen.update(keys[new].tolist())
        if not new.any():
            continue
        selected = torch.from_numpy(new)
        document = {name: value[selected].to(model.device) for name, value in tokens.items()}
        with forward_context():
            embeddings = model.embed_documents({"document": document})
        pending_keys.append(keys[new])
        pending_rows.append(dims_side_by_side(embeddings).float().cpu().numpy())
        computed += int(new.sum())
        if sum(len(k) for k in pending_keys) >= FLUSH_ROWS:
            write()
    if pending_keys:
        write()
    return computed
