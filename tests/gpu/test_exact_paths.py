"""The frozen-document cache and GradCache give the plain step's loss and gradients on the device:
the same numbers up to summation order in float32, and within bf16's bound under autocast."""

from __future__ import annotations

import pytest
from bf16_error import autocast, relative_error
from models import batch, build

from datamodules.pairs import StreamingPairDataModule
from lightning_modules.document_cache import DocumentEmbeddingCache, fill_cache

DOCUMENTS = ["kër gi", "ndox mi tàng na", "xale yi dem nañu"]


def _loss_and_gradients(model, inputs, device, bf16):
    model.zero_grad(set_to_none=True)
    with autocast(device, enabled=bf16):
        loss = model.training_loss(inputs)
    loss.backward()
    return loss.detach().float(), {
        n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16-autocast"])
def test_cache_and_grad_cache_give_the_plain_step(
    device, tiny_text_model, tiny_speech_model, tmp_path, figure, bf16
):
    inputs = batch("late_fusion", tiny_text_model, tiny_speech_model, device)
    settings = {"adapt_documents": False}  # documents take the frozen path, so the cache serves them
    plain = build("late_fusion", tiny_text_model, tiny_speech_model, **settings).to(device)
    reference = _loss_and_gradients(plain, inputs, device, bf16)

    cached = build("late_fusion", tiny_text_model, tiny_speech_model, **settings).to(device)
    cached.document_cache = DocumentEmbeddingCache(tmp_path / "cache", cached.matryoshka_dims)
    text = StreamingPairDataModule(str(tiny_text_model)).batches
    filled = fill_cache(
        cached.document_cache, cached, text.documents, DOCUMENTS, 2, lambda: autocast(device, bf16)
    )
    assert filled == len(DOCUMENTS)
    chunked = build("late_fusion", tiny_text_model, tiny_speech_model, gradient_chunk_size=2, **settings).to(
        device
    )

    if bf16:
        # A variant reshapes the bf16 products of the same path (the cache filled documents in
        # batches of other shapes; chunks are smaller batches): one more rounding pattern, of the
        # size plain bf16 moves from float32. So each may move up to twice that from plain bf16.
        full = _loss_and_gradients(plain, inputs, device, bf16=False)
        names = sorted(full[1])
        loss_bound = 2 * float((reference[0] - full[0]).abs()) + 1e-5
        gradient_bound = (
            2 * relative_error([reference[1][n] for n in names], [full[1][n] for n in names]) + 1e-5
        )
    else:
        loss_bound = gradient_bound = 1e-5  # float32, summation order only (the CPU tests' bound)
    for name, model in (("document cache", cached), ("GradCache chunks of 2", chunked)):
        loss, gradients = _loss_and_gradients(model, inputs, device, bf16)
        figure(f"{name}: loss difference", float((loss - reference[0]).abs()), loss_bound)
        assert gradients.keys() == reference[1].keys()
        names = sorted(gradients)
        error = relative_error([gradients[n] for n in names], [reference[1][n] for n in names])
        figure(f"{name}: gradient relative error", error, gradient_bound)
    assert cached.document_cache.hits == len(DOCUMENTS) and cached.document_cache.misses == 0
