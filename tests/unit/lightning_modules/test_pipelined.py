"""Pipelined: a transcript is embedded exactly as TextOnly embeds that written query (its prompt
included), an empty transcript as the prompt alone, and fit is refused."""

from __future__ import annotations

import pytest
import torch
from asr_models import save_tiny_wav2vec2_ctc
from speech_inputs import sample_clips
from transformers import AutoFeatureExtractor, AutoTokenizer

from datamodules.audio import pad_waveforms
from datamodules.text_batches import PromptConfig, TextBatchBuilder
from errors import ConfigError
from lightning_modules import Pipelined, TextOnly

DIMS = [32, 64, 128, 256]
TASKS = ["document_retrieval", "translation_retrieval", None]


def pipelined(text_model, asr_folder) -> Pipelined:
    model = Pipelined(
        text_encoder={"pretrained_model_name_or_path": str(text_model)},
        asr={"pretrained_model_name_or_path": str(asr_folder)},
        matryoshka_dims=DIMS,
    ).eval()
    model.text_queries = TextBatchBuilder(
        AutoTokenizer.from_pretrained(text_model), PromptConfig(), 64, 64, {}
    )
    return model


def speech_batch(asr_folder) -> dict:
    extractor = AutoFeatureExtractor.from_pretrained(asr_folder)
    return {"query_audio": pad_waveforms(extractor, sample_clips()), "tasks": TASKS}


def text_only_embeddings(text_model, texts: list[str]) -> dict[int, torch.Tensor]:
    """The second path: TextOnly on written queries formatted by hand with their prompts."""
    prompts = PromptConfig()
    tokenizer = AutoTokenizer.from_pretrained(text_model)
    written = [prompts.format_query(text, task) for text, task in zip(texts, TASKS, strict=True)]
    model = TextOnly(
        text_encoder={"pretrained_model_name_or_path": str(text_model)}, matryoshka_dims=DIMS
    ).eval()
    with torch.no_grad():
        return model.embed_queries({"query_text": tokenizer(written, padding=True, return_tensors="pt")})


@pytest.mark.parametrize("blank_bias", [0.0, 100.0], ids=["transcripts", "empty-transcripts"])
def test_transcripts_are_embedded_as_written_queries(tiny_text_model, tmp_path, blank_bias):
    asr_folder = save_tiny_wav2vec2_ctc(tmp_path / "asr", blank_bias=blank_bias)
    model = pipelined(tiny_text_model, asr_folder)
    batch = speech_batch(asr_folder)
    with torch.no_grad():
        embeddings = model.embed_queries(batch)
    transcripts = model.last_transcripts
    assert transcripts == model.asr(batch["query_audio"])
    if blank_bias:  # every frame blank: empty transcripts, embedded as the prompt alone
        assert transcripts == ["", "", ""]
    else:
        assert all(transcripts)
    expected = text_only_embeddings(tiny_text_model, transcripts)
    for dim in DIMS:
        assert embeddings[dim].shape == (3, dim)
        assert torch.allclose(embeddings[dim], expected[dim], atol=1e-5)
        assert torch.allclose(embeddings[dim].norm(dim=-1), torch.ones(3), atol=1e-5)
    if blank_bias:  # two tasks, two prompts: the empty queries still differ by their instruction
        assert not torch.allclose(embeddings[256][0], embeddings[256][1])


def test_evaluation_outputs_carry_the_transcripts(tiny_text_model, tmp_path):
    asr_folder = save_tiny_wav2vec2_ctc(tmp_path / "asr")
    model = pipelined(tiny_text_model, asr_folder)
    batch = speech_batch(asr_folder) | {
        "eval_set": "demo",
        "side": "queries",
        "index": torch.tensor([2, 0, 1]),
    }
    outputs = model.validation_step(batch)
    assert outputs["transcripts"] == model.asr(batch["query_audio"])
    assert sorted(outputs["embeddings"]) == DIMS


def test_fit_is_refused(tiny_text_model, tmp_path):
    model = pipelined(tiny_text_model, save_tiny_wav2vec2_ctc(tmp_path / "asr"))
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match="evaluation-only"):
        model.setup("fit")


def test_the_data_must_use_the_recognizers_feature_extractor(tiny_text_model, tiny_speech_model, tmp_path):
    from lightning_modules.pipelined import check_feature_extractor

    model = pipelined(tiny_text_model, save_tiny_wav2vec2_ctc(tmp_path / "asr"))
    check_feature_extractor(AutoFeatureExtractor.from_pretrained(tmp_path / "asr"), model.asr)
    with pytest.raises(ConfigError, match="data.init_args.audio.feature_extractor"):
        check_feature_extractor(AutoFeatureExtractor.from_pretrained(tiny_speech_model), model.asr)
    with pytest.raises(ConfigError, match="data.init_args.audio"):
        check_feature_extractor(None, model.asr)
