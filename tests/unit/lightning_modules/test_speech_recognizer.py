"""SpeechRecognizer: batched transcription equals one clip at a time (CTC and seq2seq), and CTC
greedy decoding equals an independent collapse of the frame-wise best tokens."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from asr_models import save_tiny_wav2vec2_ctc, save_tiny_whisper
from transformers import AutoFeatureExtractor

from datamodules.audio import pad_waveforms
from errors import ConfigError
from lightning_modules.components.speech_recognizer import (
    SpeechRecognizer,
    SpeechRecognizerConfig,
    ctc_frame_lengths,
    greedy_ctc_ids,
)


def clips() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    t = np.arange(32000) / 16000
    return [
        (0.4 * np.sin(2 * np.pi * 440 * t[:9000]) + 0.05 * rng.standard_normal(9000)).astype(np.float32),
        (0.3 * rng.standard_normal(24000)).astype(np.float32),
        (0.5 * np.sin(2 * np.pi * 1200 * t[:16000]) * np.sin(2 * np.pi * 3 * t[:16000])).astype(np.float32),
    ]


@pytest.fixture(scope="module")
def ctc_model(tmp_path_factory):
    return save_tiny_wav2vec2_ctc(tmp_path_factory.mktemp("tiny-ctc"))


@pytest.fixture(scope="module")
def whisper_model(tmp_path_factory):
    return save_tiny_whisper(tmp_path_factory.mktemp("tiny-whisper"))


def transcribe_batched_and_alone(folder, **settings) -> tuple[list[str], list[str], SpeechRecognizer]:
    recognizer = SpeechRecognizer(SpeechRecognizerConfig(str(folder), **settings))
    extractor = AutoFeatureExtractor.from_pretrained(folder)
    batched = recognizer(pad_waveforms(extractor, clips()))
    alone = [recognizer(pad_waveforms(extractor, [clip]))[0] for clip in clips()]
    return batched, alone, recognizer


def test_ctc_batch_transcribes_as_each_clip_alone(ctc_model):
    batched, alone, recognizer = transcribe_batched_and_alone(ctc_model)
    assert recognizer.kind == "ctc" and recognizer.masked
    assert batched == alone
    assert len({len(text) for text in batched}) > 1 and all(batched), batched  # real, varied transcripts


def test_seq2seq_batch_transcribes_as_each_clip_alone(whisper_model):
    generation = {"num_beams": 1, "do_sample": False, "max_new_tokens": 8}
    batched, alone, recognizer = transcribe_batched_and_alone(whisper_model, generation=generation)
    assert recognizer.kind == "seq2seq"
    assert batched == alone
    assert all(batched)


def test_ctc_greedy_decoding_collapses_repeats_and_blanks(ctc_model):
    """Hand-made frame scores: the processor's batch_decode of the greedy ids equals an
    independent collapse (runs of one token kept once, then blanks dropped, | as a space);
    frames past a clip's end never reach the transcript."""
    recognizer = SpeechRecognizer(SpeechRecognizerConfig(str(ctc_model)))
    tokenizer = recognizer.tokenizer
    vocab = tokenizer.get_vocab()
    frames = [
        ["<pad>", "k", "k", "a", "<pad>", "a", "a", "w", "|", "|", "b", "<pad>", "o", "o"],
        ["s", "s", "<pad>", "s", "u", "u", "<pad>", "<pad>", "x", "x", "x", "x", "x", "x"],
    ]
    lengths = torch.tensor([14, 8])  # the second clip ends before its x frames
    logits = torch.full((2, 14, len(vocab)), -5.0)
    for row, tokens in enumerate(frames):
        for frame, token in enumerate(tokens):
            logits[row, frame, vocab[token]] = 5.0
    decoded = tokenizer.batch_decode(greedy_ctc_ids(logits, lengths, tokenizer.pad_token_id))

    def collapse(tokens):
        kept = [token for token, _ in itertools.groupby(tokens) if token != "<pad>"]
        return "".join(" " if token == "|" else token for token in kept).strip()

    expected = [collapse(tokens[:length]) for tokens, length in zip(frames, lengths.tolist(), strict=True)]
    assert expected == ["kaaw bo", "ssu"]
    assert decoded == expected


def test_ctc_frame_lengths_follow_the_convolutions(ctc_model):
    recognizer = SpeechRecognizer(SpeechRecognizerConfig(str(ctc_model)))
    extractor = AutoFeatureExtractor.from_pretrained(ctc_model)
    batch = pad_waveforms(extractor, clips())
    logits = recognizer.model(**batch).logits
    lengths = ctc_frame_lengths(recognizer.model, batch["attention_mask"].sum(dim=1))
    assert int(lengths.max()) == logits.shape[1]
    for clip, length in zip(clips(), lengths.tolist(), strict=True):  # each clip alone: as many frames
        assert recognizer.model(**pad_waveforms(extractor, [clip])).logits.shape[1] == length


def test_bad_settings_name_the_key(ctc_model):
    with pytest.raises(ConfigError, match="asr.kind"):
        SpeechRecognizerConfig("x", kind="rnnt")
    with pytest.raises(ConfigError, match="asr.generation"):
        SpeechRecognizer(SpeechRecognizerConfig(str(ctc_model), generation={"num_beams": 2}))
