"""The late-fusion module at the real recipe's sizes (slow: about a minute and 6 GB of RAM).

Random weights from the published configurations, so nothing is downloaded: Qwen3-0.6B
(hidden 1024, 28 layers, 16 query heads, 8 KV heads) as the text tower and HuBERT-base
(hidden 768, 12 layers, GroupNorm waveform encoder) as the speech tower.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoFeatureExtractor, AutoTokenizer

from datamodules.audio import pad_waveforms
from datamodules.demo import assets
from datamodules.text_batches import PromptConfig, TextBatchBuilder
from lightning_modules import LateFusion
from lightning_modules.components.clip_group_norm import ClipGroupNorm
from lightning_modules.losses import matryoshka_info_nce


@pytest.mark.slow
def test_late_fusion_forward_and_backward_at_real_size(tmp_path, tiny_text_model):
    text_dir, speech_dir = assets.save_real_size_models(tmp_path, tiny_text_model)
    model = LateFusion(
        text_encoder={"pretrained_model_name_or_path": str(text_dir)},
        speech_encoder={"pretrained_model_name_or_path": str(speech_dir)},
        adapter={"fusion": "concat", "conv_channels": 1024, "kernel_size": 3, "stride": 2},
        matryoshka_dims=[128, 256, 512, 1024],
    )
    assert model.text_encoder.model.config.num_hidden_layers == 28
    assert model.speech_encoder.num_layers == 12
    # HuBERT-base's GroupNorm is found, so batches can run with per-clip statistics off CPU.
    assert isinstance(model.speech_encoder.clip_norm, ClipGroupNorm)
    assert model.speech_encoder.runs_clip_by_clip(torch.device("cpu"))
    assert model.adapter.fusion.output_size == 12 * 768

    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (16000, 12000)]  # 1 s, 0.75 s
    text = TextBatchBuilder(AutoTokenizer.from_pretrained(text_dir), PromptConfig(), 64, 64, {})
    batch = {
        "query_audio": pad_waveforms(AutoFeatureExtractor.from_pretrained(speech_dir), clips),
        "prompt": text.prompt_tokens(["document_retrieval", "translation_retrieval"]),
        "document": text.documents(["fêlo rélo", "cîzôlôz céélêlîh rôcé"]),
    }
    model.train()
    queries = model.embed_queries(batch)
    assert {d: tuple(v.shape) for d, v in queries.items()} == {d: (2, d) for d in (128, 256, 512, 1024)}
    loss = matryoshka_info_nce(queries, model.embed_documents(batch), temperature=0.05)
    loss.backward()
    assert torch.isfinite(loss)
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == name.startswith("adapter."), name
    adapter_grads = torch.cat([p.grad.flatten() for p in model.adapter.parameters()])
    assert torch.isfinite(adapter_grads).all() and adapter_grads.abs().sum() > 0
