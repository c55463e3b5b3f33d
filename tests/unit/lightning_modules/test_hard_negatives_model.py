"""Models with hard negatives: one document pass (whole, in GradCache chunks, or read from the
frozen-document cache) gives the loss that embedding documents and negatives apart gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from speech_inputs import DIMS, speech_text_batch
from text_rows import text_rows

from datamodules.pairs import StreamingPairDataModule
from lightning_modules import LateFusion, TextOnly
from lightning_modules.components.matryoshka import dims_side_by_side
from lightning_modules.components.text_encoder import LoraSettings, TextEncoderConfig
from lightning_modules.document_cache import DocumentEmbeddingCache, fill_cache, tokenized_document_keys
from lightning_modules.hard_negatives import HardNegatives
from lightning_modules.losses import LossInputs, MatryoshkaInfoNCE


def _rows_with_negatives(count: int) -> list[dict]:
    rows = text_rows(count)
    for i, row in enumerate(rows):
        if i % 3:  # every third row has none
            row["negatives"] = [
                f"{text_rows(1, start=30 + 2 * i + k)[0]['document']} n{i}" for k in range(i % 3)
            ]
    rows[4]["negatives"] = [rows[0]["document"]]  # row 0's document: a false negative for row 0
    return rows


def _randomized_lora(model):
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    return model.train()


def _text_only(text_model, chunk, own=False) -> TextOnly:
    torch.manual_seed(0)
    model = TextOnly(
        TextEncoderConfig(str(text_model), lora=LoraSettings(r=4, dropout=0.0)),
        matryoshka_dims=[32, 128, 256],
        loss=MatryoshkaInfoNCE(temperature=1.0, own_negatives_only=own),
        gradient_chunk_size=chunk,
    )
    return _randomized_lora(model)


def _loss_and_gradients(model, batch):
    model.zero_grad()
    loss = model.training_loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _batch(text_model, rows, num_negatives=2) -> dict:
    return StreamingPairDataModule(str(text_model), num_negatives=num_negatives).batches.training_batch(rows)


@pytest.mark.parametrize("own", [False, True], ids=["every-rows-negatives", "own-negatives"])
def test_one_document_pass_equals_documents_and_negatives_embedded_apart(tiny_text_model, own):
    rows = _rows_with_negatives(7)
    batch = _batch(tiny_text_model, rows)
    model = _text_only(tiny_text_model, None, own)
    builder = StreamingPairDataModule(str(tiny_text_model)).batches
    listed = [(i, text) for i, row in enumerate(rows) for text in (row.get("negatives") or [])[:2]]
    negatives = builder.documents([text for _, text in listed])  # tokenized apart, own padding
    with torch.no_grad():
        queries = model.embed_queries(batch)
        documents = model.embed_documents({"document": builder.documents([row["document"] for row in rows])})
        hard = HardNegatives(
            model.embed_documents({"document": negatives}),
            torch.tensor([i for i, _ in listed]),
            tokenized_document_keys(negatives),
        )
        apart = model.loss(
            LossInputs(queries, documents, document_keys=batch["document_keys"], negatives=hard)
        )
        joint = model.training_loss(batch)
    assert torch.allclose(joint, apart, atol=1e-5)
    assert torch.equal(batch["negative_rows"], hard.rows)


@pytest.mark.parametrize("chunk", [1, 4])
def test_gradcache_with_negatives_gives_the_plain_steps_gradients(tiny_text_model, chunk):
    batch = _batch(tiny_text_model, _rows_with_negatives(8))
    assert len(batch["negative_rows"]) > chunk  # chunks mix documents and negatives
    loss, grads = _loss_and_gradients(_text_only(tiny_text_model, None), batch)
    chunked_loss, chunked_grads = _loss_and_gradients(_text_only(tiny_text_model, chunk), batch)
    assert torch.allclose(chunked_loss, loss, atol=1e-5, rtol=0)
    assert chunked_grads.keys() == grads.keys() and grads
    for name, gradient in grads.items():
        assert gradient.abs().max() > 1e-7, f"{name}: zero reference gradient"
        assert torch.allclose(chunked_grads[name], gradient, atol=1e-5, rtol=0), name


def test_the_frozen_document_cache_serves_the_negatives(tiny_text_model, tiny_speech_model, tmp_path):
    """Late fusion with documents on the frozen path: documents and negatives are read from the
    cache (no miss), and the loss is the one computed without the cache."""
    torch.manual_seed(0)
    model = LateFusion(
        TextEncoderConfig(str(tiny_text_model), lora=LoraSettings(r=4, dropout=0.0)),
        {"pretrained_model_name_or_path": str(tiny_speech_model)},
        matryoshka_dims=DIMS,
        adapt_documents=False,
    ).eval()
    assert model.document_tower_frozen
    batch = speech_text_batch(tiny_text_model, tiny_speech_model)
    builder = StreamingPairDataModule(str(tiny_text_model)).batches
    documents, negatives = ["kër gi", "ndox mi tàng na", "xale yi dem nañu"], ["suuna deeku", "baabu tiimo"]
    joint = builder.documents(documents + negatives)
    batch["document"] = {key: value[:3] for key, value in joint.items()}
    batch["negatives"] = {key: value[3:] for key, value in joint.items()}
    batch["negative_rows"] = torch.tensor([0, 2])
    batch["ids"] = ["a", "b", "c"]
    with torch.no_grad():
        without_cache = model.training_loss(batch)
        cache = DocumentEmbeddingCache(tmp_path / "cache", DIMS)
        fill_cache(cache, model, builder.documents, documents + negatives)
        model.document_cache = cache
        with_cache = model.training_loss(batch)
    assert (cache.hits, cache.misses) == (5, 0)
    assert torch.allclose(with_cache, without_cache, atol=1e-5)
    stored = cache._rows(
        cache.find(np.asarray(tokenized_document_keys(batch["negatives"]).numpy().view(np.uint64)))
    )
    with torch.no_grad():
        fresh = dims_side_by_side(model.embed_documents({"document": batch["negatives"]}))
    assert np.allclose(stored, fresh.numpy(), atol=1e-5)
