"""Speech-query inputs shared by the late-fusion and dual-encoder tests (clips, batches, dims)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoFeatureExtractor, AutoTokenizer

from datamodules.audio import pad_waveforms
from datamodules.text_batches import PromptConfig, TextBatchBuilder

DIMS = [32, 64, 128, 256]


def sample_clips() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    return [
        (0.3 * np.sin(2 * np.pi * 300 * t[:8000]) + 0.01 * rng.standard_normal(8000)).astype(np.float32),
        (0.5 * np.sin(2 * np.pi * 900 * t) + 0.05 * rng.standard_normal(16000)).astype(np.float32),
        rng.standard_normal(14000).astype(np.float32) * 0.2,
    ]


def query_batch(text_model, speech_model, clips, tasks) -> dict:
    text = TextBatchBuilder(AutoTokenizer.from_pretrained(text_model), PromptConfig(), 64, 64, {})
    extractor = AutoFeatureExtractor.from_pretrained(speech_model)
    return {"query_audio": pad_waveforms(extractor, clips), "prompt": text.prompt_tokens(tasks)}


def speech_text_batch(text_model, speech_model) -> dict:
    batch = query_batch(text_model, speech_model, sample_clips(), ["transcription_retrieval"] * 3)
    text = TextBatchBuilder(AutoTokenizer.from_pretrained(text_model), PromptConfig(), 64, 64, {})
    batch["query_text"] = text.tokenizer(
        ["baabu kaaji", "tiimo", "suuna deeku xoomi"], padding=True, return_tensors="pt"
    )
    return batch


def assert_first_query_embeds_alone_as_batched(model, text_model, speech_model, tasks) -> None:
    """The first of ``sample_clips()`` embeds as alone when batched with longer clips (< 1e-4, every dim)."""
    clips = sample_clips()
    with torch.no_grad():
        alone = model.embed_queries(query_batch(text_model, speech_model, clips[:1], tasks[:1]))
        batched = model.embed_queries(query_batch(text_model, speech_model, clips, tasks))
    for dim in DIMS:
        assert (alone[dim][0] - batched[dim][0]).abs().max() < 1e-4, dim
