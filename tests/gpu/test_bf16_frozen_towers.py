"""Frozen towers loaded in bf16 (``dtype: bfloat16``, half the memory) embed as their float32
weights do, within the bound of their path (``bf16_error``), under the step's autocast."""

from __future__ import annotations

import torch
from bf16_error import autocast, relative_bound, row_errors
from models import PATH_PRODUCTS, batch
from speech_inputs import DIMS

from lightning_modules import LateFusion
from lightning_modules.components.text_encoder import TextEncoderConfig


def _late_fusion(text_model, speech_model, dtype: str, device) -> LateFusion:
    torch.manual_seed(0)  # the same adapter in both
    return (
        LateFusion(
            TextEncoderConfig(str(text_model), dtype=dtype),
            {"pretrained_model_name_or_path": str(speech_model), "dtype": dtype, "layers": [0, 1, 2]},
            adapter={"fusion": "concat", "conv_channels": 64, "kernel_size": 7, "stride": 4},
            matryoshka_dims=DIMS,
        )
        .to(device)
        .eval()
    )


def test_towers_loaded_in_bf16_embed_as_float32(device, tiny_text_model, tiny_speech_model, figure):
    inputs = batch("late_fusion", tiny_text_model, tiny_speech_model, device)
    full = _late_fusion(tiny_text_model, tiny_speech_model, "float32", device)
    half = _late_fusion(tiny_text_model, tiny_speech_model, "bfloat16", device)
    frozen = [p for p in half.text_encoder.parameters()] + [p for p in half.speech_encoder.parameters()]
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    with torch.no_grad():
        want = {"queries": full.embed_queries(inputs), "documents": full.embed_documents(inputs)}
        with autocast(device):
            got = {"queries": half.embed_queries(inputs), "documents": half.embed_documents(inputs)}
    for side, products in PATH_PRODUCTS["late_fusion"].items():
        if side not in want:
            continue
        # Weights rounded once more than autocast's inputs: one product's worth per product.
        bound = relative_bound(2 * products)
        for dim in DIMS:
            assert got[side][dim].dtype in (torch.float32, torch.bfloat16)
            figure(
                f"{side} d{dim} relative error",
                float(row_errors(got[side][dim], want[side][dim]).max()),
                bound,
            )
