"""Frozen-document cache: exact (same loss, same eval embeddings), reused, and invalidated by changes."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from speech_inputs import DIMS
from trainers import quiet_cpu_trainer

from callbacks.retrieval import RetrievalEvaluator
from datamodules.audio import AudioSettings
from datamodules.pairs import StreamingPairDataModule
from errors import ConfigError
from lightning_modules import LateFusion, TextOnly
from lightning_modules.components.text_encoder import LoraSettings, TextEncoderConfig
from lightning_modules.document_cache import DocumentEmbeddingCache, token_keys, tower_fingerprint
from lightning_modules.losses import MatryoshkaInfoNCE, TranscriptionAlignment, WeightedSum


class CompareWithoutCache(Callback):
    """Before each step and each corpus batch: the model's numbers with and without the cache."""

    def __init__(self):
        self.loss_diffs, self.embedding_diffs, self.rows = [], [], 0

    def _without_cache(self, pl_module, compute):
        cache, pl_module.document_cache = pl_module.document_cache, None
        try:
            return compute()
        finally:
            pl_module.document_cache = cache

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        assert pl_module.document_cache is not None
        with torch.no_grad():
            cached = pl_module.training_loss(batch)
            computed = self._without_cache(pl_module, lambda: pl_module.training_loss(batch))
        self.loss_diffs.append(float((cached - computed).abs()))
        self.rows += len(batch["ids"])

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch["side"] != "corpus":
            return
        with torch.no_grad():
            cached = pl_module.document_embeddings(batch)
            computed = self._without_cache(pl_module, lambda: pl_module.document_embeddings(batch))
        self.embedding_diffs += [float((cached[d] - computed[d]).abs().max()) for d in DIMS]


def _late_fusion(text_model, speech_model, cache_dir=None) -> LateFusion:
    seed_everything(0)
    return LateFusion(
        TextEncoderConfig(str(text_model), lora=LoraSettings(r=4, dropout=0.0)),
        {"pretrained_model_name_or_path": str(speech_model)},
        adapt_documents=False,  # LoRA adapts the speech queries; documents keep the text model's embeddings
        loss=WeightedSum([MatryoshkaInfoNCE(), TranscriptionAlignment()], [1.0, 0.5]),
        matryoshka_dims=DIMS,
        document_cache=None if cache_dir is None else str(cache_dir),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
    )


def _fit(root, model, speech_corpus_dir, text_model, speech_model, steps=3):
    data = StreamingPairDataModule(
        str(text_model),
        train_data=str(speech_corpus_dir / "train"),
        eval_sets={"demo": str(speech_corpus_dir / "eval" / "demo")},
        audio=AudioSettings(feature_extractor=str(speech_model), min_duration=0.5),
        batch_size=8,
        max_query_length=64,
        max_document_length=64,
    )
    compare = CompareWithoutCache()
    trainer = quiet_cpu_trainer(
        max_steps=steps,
        val_check_interval=steps,
        default_root_dir=root,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        callbacks=[compare, RetrievalEvaluator(dashboards=False)],
    )
    trainer.fit(model, data)
    return compare, data


def _parts(cache_dir) -> list:
    return sorted(cache_dir.glob("*/*.keys.npy"))


def test_training_and_evaluation_read_the_cache_with_the_numbers_of_the_model(
    tmp_path, tiny_text_model, tiny_speech_model, speech_corpus_dir, caplog
):
    cache_dir = tmp_path / "cache"
    model = _late_fusion(tiny_text_model, tiny_speech_model, cache_dir)
    with caplog.at_level(logging.INFO, logger="callbacks.training_guards"):
        compare, data = _fit(tmp_path, model, speech_corpus_dir, tiny_text_model, tiny_speech_model)
    # At training start the model named the frozen tower behind Lightning's eval-mode warning
    # (the text model trains LoRA adapters here, so it is in train mode).
    assert "of the frozen towers ['speech_encoder.model'] run in eval mode" in caplog.text
    # The loss read from the cache is the loss computed by the model (all dims, alignment included).
    assert len(compare.loss_diffs) == 3 and max(compare.loss_diffs) < 1e-5
    # Every corpus batch of the validation too, every dim.
    assert compare.embedding_diffs and max(compare.embedding_diffs) < 1e-5
    # Every training and corpus document came from the cache, none was computed on the way.
    cache = model.document_cache
    assert cache.misses == 0 and cache.hits >= compare.rows
    distinct = list(data.distinct_documents())
    assert len(cache) == len(distinct)

    # A second run of the same frozen model reuses the folder: nothing new is written.
    parts = _parts(cache_dir)
    assert len(parts) == 1
    _fit(
        tmp_path,
        _late_fusion(tiny_text_model, tiny_speech_model, cache_dir),
        speech_corpus_dir,
        tiny_text_model,
        tiny_speech_model,
        steps=1,
    )
    assert _parts(cache_dir) == parts


def test_a_changed_frozen_weight_gets_a_new_fingerprint_and_trained_weights_do_not(
    tiny_text_model, tiny_speech_model
):
    model = _late_fusion(tiny_text_model, tiny_speech_model)
    tower = model.document_tower()
    settings = ["LateFusion", "dims=[32, 64, 128, 256]"]
    before = tower_fingerprint(tower, settings)
    with torch.no_grad():
        next(p for n, p in tower.named_parameters() if "lora_A" in n).add_(1.0)  # trains: not part of it
    assert tower_fingerprint(tower, settings) == before
    assert tower_fingerprint(tower, [*settings, "precision=bf16-mixed"]) != before
    with torch.no_grad():
        next(p for n, p in tower.named_parameters() if not p.requires_grad).add_(1e-3)
    assert tower_fingerprint(tower, settings) != before


def test_a_document_the_cache_lacks_is_computed_and_counted(tmp_path, tiny_text_model):
    data = StreamingPairDataModule(str(tiny_text_model))
    documents = data.tokenize_documents(["kër gi", "ndox mi tàng na", "xale yi dem nañu"])
    keys = token_keys(documents["input_ids"], documents["attention_mask"])
    # The same text alone (other padding) has the same key; a different text does not.
    alone = data.tokenize_documents(["kër gi"])
    assert token_keys(alone["input_ids"], alone["attention_mask"])[0] == keys[0]
    assert len(set(keys.tolist())) == 3

    cache = DocumentEmbeddingCache(tmp_path, [2, 4])
    stored = np.arange(12, dtype=np.float32).reshape(2, 6)
    cache.add(keys[:2], stored)
    asked = []

    def compute(document):
        asked.append(document["input_ids"].shape[0])
        return {
            2: torch.full((len(document["input_ids"]), 2), -1.0),
            4: torch.full((len(document["input_ids"]), 4), -2.0),
        }

    out = cache.lookup(documents, compute)
    assert asked == [1] and (cache.hits, cache.misses) == (2, 1)
    assert torch.equal(out[2][:2], torch.from_numpy(stored[:, :2]))
    assert torch.equal(out[4][:2], torch.from_numpy(stored[:, 2:]))
    assert torch.equal(out[2][2], torch.tensor([-1.0, -1.0]))
    # A part whose keys file never got written (a writer killed between renames) is ignored.
    (tmp_path / "orphan.embeddings.npy").write_bytes(b"")
    assert len(DocumentEmbeddingCache(tmp_path, [2, 4])) == 2


def test_lookup_gathers_rows_from_every_part_in_the_asked_order(tmp_path, tiny_text_model):
    """Parts as several ranks write them; documents asked interleaved, repeated and out of order."""
    data = StreamingPairDataModule(str(tiny_text_model))
    texts = [f"kër gi {'ak ndox ' * i}" for i in range(12)]
    documents = data.tokenize_documents(texts)
    keys = token_keys(documents["input_ids"], documents["attention_mask"])
    vectors = np.random.default_rng(0).standard_normal((12, 6)).astype(np.float32)
    cache = DocumentEmbeddingCache(tmp_path, [2, 4])
    for part in range(3):  # three parts of four rows, as three ranks would write them
        cache.add(keys[part::3], vectors[part::3], name=f"rank{part}")
    asked = [7, 0, 11, 3, 0, 5, 10]
    out = cache.lookup(data.tokenize_documents([texts[i] for i in asked]), compute=None)
    assert cache.misses == 0
    assert torch.equal(torch.cat([out[2], out[4]], dim=1), torch.from_numpy(vectors[asked]))


def test_a_trainable_document_tower_is_refused(tmp_path, tiny_text_model, corpus_dir):
    model = TextOnly(
        TextEncoderConfig(str(tiny_text_model)), matryoshka_dims=[32, 256], document_cache=str(tmp_path)
    )
    data = StreamingPairDataModule(str(tiny_text_model), train_data=str(corpus_dir / "train.jsonl"))
    trainer = Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    with pytest.raises(ConfigError, match="change while it trains"):
        trainer.fit(model, data)


def test_listing_the_documents_does_not_read_the_audio(tmp_path, tiny_text_model, speech_corpus_dir):
    """A parquet stream's audio pages are overwritten with junk: reading them fails, yet the
    documents are listed (the cache's fill reads the document column only, not every clip)."""
    import pyarrow.parquet as pq

    shard = sorted((speech_corpus_dir / "train").glob("*.parquet"))[0]
    table = pq.read_table(shard)
    path = tmp_path / "train.parquet"
    pq.write_table(table, path)
    metadata = pq.ParquetFile(path).metadata
    raw = bytearray(path.read_bytes())
    audio_columns = [
        i for i in range(metadata.num_columns) if metadata.schema.column(i).path.startswith("audio")
    ]
    for group in range(metadata.num_row_groups):
        for i in audio_columns:
            chunk = metadata.row_group(group).column(i)
            start = chunk.dictionary_page_offset or chunk.data_page_offset
            raw[start : start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    path.write_bytes(bytes(raw))
    with pytest.raises(OSError):  # the audio really is unreadable
        pq.read_table(path, columns=["audio"]).to_pylist()

    data = StreamingPairDataModule(str(tiny_text_model), train_data=str(path), eval_sets={})
    documents = list(data.distinct_documents())
    assert documents == list(dict.fromkeys(table.column("document").to_pylist()))
