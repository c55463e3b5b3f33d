"""bf16-mixed training steps against float32, every model: embeddings, loss and gradients within
the bounds ``bf16_error`` derives from each model's path; the InfoNCE logits stay float32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bf16_error import autocast, gradient_bound, relative_bound, relative_error, row_errors
from models import MODELS, PATH_PRODUCTS, batch, build
from torch.overrides import TorchFunctionMode

from lightning_modules.losses import matryoshka_info_nce

SIDES = {"queries": "queries", "documents": "documents", "transcriptions": "transcriptions"}


def _step(model, inputs_batch, device, bf16: bool):
    model.zero_grad(set_to_none=True)
    with autocast(device, enabled=bf16):
        inputs = model.loss_inputs(inputs_batch)
        loss = model.loss(inputs)
    loss.backward()
    gradients = {
        n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None
    }
    return loss.detach().float(), inputs, gradients


@pytest.mark.parametrize("name", MODELS)
def test_bf16_mixed_step_matches_float32(name, device, tiny_text_model, tiny_speech_model, figure):
    model = build(name, tiny_text_model, tiny_speech_model).to(device)
    inputs_batch = batch(name, tiny_text_model, tiny_speech_model, device)
    loss32, inputs32, grads32 = _step(model, inputs_batch, device, bf16=False)
    loss16, inputs16, grads16 = _step(model, inputs_batch, device, bf16=True)

    loss_bound, moved = 0.0, 0.0
    normalized_error = {}
    for side, products in PATH_PRODUCTS[name].items():
        want, got = getattr(inputs32, side), getattr(inputs16, side)
        for dim in want:
            error = float(row_errors(got[dim], want[dim]).max())
            figure(f"{side} d{dim} relative error", error, relative_bound(products))
            moved = max(moved, error)
            normalized_error[side, dim] = float(
                row_errors(
                    F.normalize(got[dim].float(), dim=-1), F.normalize(want[dim].float(), dim=-1)
                ).max()
            )
    # Every term (InfoNCE at temperature 1, alignment) moves by at most 2 x (the moves of its two
    # unit-length sides) per dim: cross entropy is 2-Lipschitz in its logits, here cosines.
    others = [side for side in PATH_PRODUCTS[name] if side != "queries"]
    for side in others:
        for dim in getattr(inputs32, side):
            loss_bound += 2 * (normalized_error["queries", dim] + normalized_error[side, dim])
    figure("loss difference", float((loss16 - loss32).abs()), loss_bound)
    # Not a float32 run twice: autocast really rounded (a float32 rerun moves by ~1e-7).
    assert moved > 2.0**-14, "bf16 autocast changed nothing: the step did not run in bf16"

    assert grads16.keys() == grads32.keys() and grads32
    names = sorted(grads32)
    longest = max(PATH_PRODUCTS[name].values())
    figure(
        "gradient relative error",
        relative_error([grads16[n] for n in names], [grads32[n] for n in names]),
        gradient_bound(longest),
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable)  # master weights stay float32


class _CrossEntropyInputs(TorchFunctionMode):
    """Records the dtype of every logits tensor ``F.cross_entropy`` receives."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.cross_entropy:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_logits_stay_float32_under_autocast(device, figure, symmetric):
    """bf16 embeddings, as autocast hands them over: the loss equals the same loss computed from
    their float32 copies with autocast off. Logits in bf16 would round by up to 2^-9 x 1/0.05 =
    0.04 at the recipe's temperature, and the loss with them."""
    generator = torch.Generator().manual_seed(0)
    queries = {d: torch.randn(32, d, generator=generator).to(device, torch.bfloat16) for d in (64, 256)}
    documents = {d: torch.randn(32, d, generator=generator).to(device, torch.bfloat16) for d in (64, 256)}
    with autocast(device), _CrossEntropyInputs() as recorded:
        under_autocast = matryoshka_info_nce(queries, documents, 0.05, symmetric=symmetric)
    reference = matryoshka_info_nce(
        {d: q.float() for d, q in queries.items()},
        {d: t.float() for d, t in documents.items()},
        0.05,
        symmetric=symmetric,
    )
    assert recorded.dtypes and all(dtype == torch.float32 for dtype in recorded.dtypes)
    assert under_autocast.dtype == torch.float32
    figure("InfoNCE under autocast vs float32", float((under_autocast - reference).abs()), 1e-5)
