"""Frozen-tower document embeddings, computed once and read from disk.

When the document tower is frozen, a document's embedding is the same at every step, so it is
computed once and looked up afterwards. Entries are keyed by the document's token ids (the text
exactly as the model sees it: tokenizer, truncation and all) and live in a folder named by a
fingerprint of everything else that shapes the embedding (the tower's frozen weights and
buffers, the model class, the Matryoshka dims, the precision). A changed model gets a new folder;
changed data gets new keys, computed on first sight. Each folder holds parts written atomically
(``<name>.keys.npy``: uint64 keys, ``<name>.embeddings.npy``: float32 rows, memory-mapped on
read), so ranks can write their shares side by side.

A model opens its cache itself when ``model.document_cache`` names a folder (``open_document_cache``,
at the start of fit / validate / test): the distinct documents of the training data and eval
corpora are tokenized as batches tokenize them, the ones the cache lacks are embedded (each rank
takes every world_size-th document and writes its own part), and ``document_embeddings`` reads the
cache from then on. A document the cache lacks (data that changed mid-run) is embedded by the
model, so the loss is the one without the cache; ``train/document_cache_misses`` counts them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningModule
from torch import nn

from errors import ConfigError
from lightning_modules.components.matryoshka import dims_side_by_side, split_dims

log = logging.getLogger(__name__)

# 64-bit keys: the chance that two of n documents collide is about n**2 / 2**65 (1e6 documents:
# 3e-8; 1e8 documents: 3e-4), and a collision would hand one document the other's embedding.
KEY_BYTES = 8
FLUSH_ROWS = 65_536  # rows held in memory before a part is written
FILL_BATCH_SIZE = 64  # documents per forward pass while filling


def token_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
    """One uint64 key per row: a hash of the row's real tokens (padding side and length ignored)."""
    ids = input_ids.detach().cpu().to(torch.int64)
    mask = attention_mask.detach().cpu().bool()
    keys = np.empty(ids.shape[0], dtype=np.uint64)
    for row in range(ids.shape[0]):
        digest = hashlib.blake2b(ids[row][mask[row]].numpy().tobytes(), digest_size=KEY_BYTES).digest()
        keys[row] = np.frombuffer(digest, dtype=np.uint64)[0]
    return keys


def tokenized_document_keys(document: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``token_keys`` of a tokenized batch as an int64 tensor: equal for identical documents (as
    tokenized, so as the model sees them). Several queries of one document (three voices reading
    it, several questions) put copies of it in a batch."""
    keys = token_keys(document["input_ids"], document["attention_mask"])
    return torch.from_numpy(keys.view(np.int64))


def tower_fingerprint(tower: nn.Module, settings: Iterable[str]) -> str:
    """Hash of the tower's frozen parameters and its buffers, plus ``settings`` (class, dims, precision).

    Trainable parameters are left out: they cannot shape a frozen document path (LoRA adapters
    that documents bypass, for instance), and they change every step.
    """
    digest = hashlib.blake2b(digest_size=16)
    for text in settings:
        digest.update(text.encode() + b"\0")
    named = [(name, p) for name, p in tower.named_parameters() if not p.requires_grad]
    named += list(tower.named_buffers())
    for name, tensor in sorted(named, key=lambda item: item[0]):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


class DocumentEmbeddingCache:
    """The cached embeddings of one fingerprint folder: ``lookup`` by token ids, ``add`` new ones."""

    def __init__(self, directory: str | Path, dims: list[int]):
        self.directory = Path(directory)
        self.dims = list(dims)
        self.width = sum(self.dims)
        self.hits = 0
        self.misses = 0
        self.reload()

    def reload(self) -> None:
        """Reads every complete part in the folder (parts written by other ranks included)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        keys, parts, rows = [], [], []
        for part_index, keys_file in enumerate(sorted(self.directory.glob("*.keys.npy"))):
            embeddings_file = keys_file.with_name(keys_file.name.replace(".keys.npy", ".embeddings.npy"))
            if not embeddings_file.exists():
                continue  # a part whose writer died between the two renames: its rows are recomputed
            part_keys = np.load(keys_file)
            embeddings = np.load(embeddings_file, mmap_mode="r")
            if embeddings.shape != (len(part_keys), self.width):
                raise ValueError(
                    f"{embeddings_file}: shape {embeddings.shape}, expected ({len(part_keys)}, {self.width})."
                )
            keys.append(part_keys)
            parts.append(embeddings)
            rows.append(np.stack([np.full(len(part_keys), part_index), np.arange(len(part_keys))], axis=1))
        self._parts = dict(enumerate(parts))
        all_keys = np.concatenate(keys) if keys else np.empty(0, dtype=np.uint64)
        locations = np.concatenate(rows) if rows else np.empty((0, 2), dtype=np.int64)
        # A key written twice (two ranks, or two runs) keeps one location: they hold the same vector.
        self._keys, first = np.unique(all_keys, return_index=True)
        self._locations = locations[first]

    def __len__(self) -> int:
        return len(self._keys)

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Index into the cache of each key, -1 where absent."""
        if not len(self._keys):
            return np.full(len(keys), -1)
        positions = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
        return np.where(self._keys[positions] == keys, positions, -1)

    def add(self, keys: np.ndarray, embeddings: np.ndarray, name: str | None = None) -> None:
        """Writes a part (temporary names, then renames: a reader never sees half a part)."""
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.shape != (len(keys), self.width):
            raise ValueError(f"embeddings shape {embeddings.shape}, expected ({len(keys)}, {self.width}).")
        name = name or uuid.uuid4().hex
        for suffix, array in ((".embeddings.npy", embeddings), (".keys.npy", keys.astype(np.uint64))):
            final = self.directory / f"{name}{suffix}"
            partial = self.directory / f".{name}{suffix}.partial"
            with open(partial, "wb") as handle:
                np.save(handle, array)
            os.replace(partial, final)  # embeddings first: a keys file always has its embeddings
        self.reload()

    def _rows(self, positions: np.ndarray) -> np.ndarray:
        """The embeddings at ``positions``: one gather per part file (not one read per row)."""
        out = np.empty((len(positions), self.width), dtype=np.float32)
        locations = self._locations[positions]
        for part in np.unique(locations[:, 0]):
            selected = locations[:, 0] == part
            out[selected] = self._parts[int(part)][locations[selected, 1]]
        return out

    def lookup(
        self,
        document: Mapping[str, torch.Tensor],
        compute: Callable[[Mapping[str, torch.Tensor]], Mapping[int, torch.Tensor]],
    ) -> dict[int, torch.Tensor]:
        """``{dim: [B, dim]}`` for tokenized documents; rows not in the cache go through ``compute``."""
        keys = token_keys(document["input_ids"], document["attention_mask"])
        positions = self.find(keys)
        hit = positions >= 0
        device = document["input_ids"].device
        flat = torch.empty(len(keys), self.width, dtype=torch.float32, device=device)
        if hit.any():
            flat[torch.from_numpy(hit).to(device)] = torch.from_numpy(self._rows(positions[hit])).to(device)
        if not hit.all():
            missing = torch.from_numpy(~hit).to(device)
            computed = compute({key: value[missing] for key, value in document.items()})
            flat[missing] = dims_side_by_side(computed).float()
        self.hits += int(hit.sum())
        self.misses += int((~hit).sum())
        return split_dims(flat, self.dims)


def document_keys(batch: Mapping, queries: Mapping[int, torch.Tensor]) -> torch.Tensor | None:
    """The batch's ``document_keys`` (the batch builder hashes them), or hashed here for a batch
    built otherwise; None without documents."""
    keys = batch.get("document_keys")
    if keys is None and batch.get("document") is not None:
        keys = tokenized_document_keys(batch["document"])
    return None if keys is None else keys.to(next(iter(queries.values())).device)


def open_document_cache(model, directory: str | Path, include_training: bool) -> DocumentEmbeddingCache:
    """The model's cache folder for its current frozen document tower, filled with every document of
    the datamodule (``distinct_documents`` and ``tokenize_documents``, the datamodule's contract)."""
    trainer = model.trainer
    if not model.document_tower_frozen:
        raise ConfigError(
            f"model.document_cache: the document embeddings of {type(model).__name__} change while it "
            "trains (a trainable text tower, or LoRA adapters on documents). Remove document_cache, or "
            "freeze the document path (LateFusion: freeze_text_encoder without lora, or "
            "adapt_documents: false)."
        )
    datamodule = trainer.datamodule
    if datamodule is None or not hasattr(datamodule, "distinct_documents"):
        raise ConfigError("model.document_cache needs the StreamingPairDataModule (data: ...).")
    tower = model.document_tower()
    settings = [
        type(model).__name__,
        repr(getattr(tower, "config", None)),
        f"dims={model.matryoshka_dims}",
        f"precision={trainer.precision}",
    ]
    started = time.perf_counter()
    cache = DocumentEmbeddingCache(
        Path(directory) / tower_fingerprint(tower, settings), model.matryoshka_dims
    )
    texts = list(datamodule.distinct_documents(include_training))
    computed = fill_cache(
        cache,
        model,
        datamodule.tokenize_documents,
        texts[trainer.global_rank :: trainer.world_size],
        FILL_BATCH_SIZE,
        trainer.precision_plugin.forward_context,
        part_prefix=f"rank{trainer.global_rank}",
    )
    trainer.strategy.barrier("document_cache_filled")
    cache.reload()
    cache.hits = cache.misses = 0
    log.info(
        "document cache %s: %d documents, %d computed by this rank in %.1f s",
        cache.directory,
        len(cache),
        computed,
        time.perf_counter() - started,
    )
    return cache


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


class CachedDocuments(LightningModule):
    """The seam between a model and its frozen-document cache: ``document_embeddings`` reads it.

    A model sets ``document_cache_dir`` (its ``document_cache`` argument) and says whether its
    document path is frozen; the cache opens at the start of fit / validate / test.
    """

    def __init__(self):
        super().__init__()
        self.document_cache_dir: str | None = None
        self.document_cache: DocumentEmbeddingCache | None = None

    @property
    def document_tower_frozen(self) -> bool:
        """True when no trainable weight shapes a document's embedding (it can then be cached)."""
        return False

    def document_tower(self) -> torch.nn.Module | None:
        """The module whose frozen weights make the document embeddings (the cache's fingerprint)."""
        return None

    def document_embeddings(self, batch: Mapping) -> dict[int, torch.Tensor]:
        """``embed_documents``, read from the frozen-document cache when one is open."""
        if self.document_cache is None:
            return self.embed_documents(batch)
        return self.document_cache.lookup(
            batch["document"], lambda docs: self.embed_documents({"document": docs})
        )

    def on_fit_start(self) -> None:
        if self.document_cache_dir is not None:
            self.document_cache = open_document_cache(self, self.document_cache_dir, include_training=True)

    def on_validation_start(self) -> None:
        if self.document_cache_dir is not None and self.document_cache is None:
            self.document_cache = open_document_cache(self, self.document_cache_dir, include_training=False)

    on_test_start = on_validation_start
