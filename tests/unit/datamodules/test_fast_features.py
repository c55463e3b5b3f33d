"""The vectorized speech inputs equal the speech model's own feature extractor, clip by clip."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoFeatureExtractor

from datamodules.audio import pad_waveforms
from datamodules.fast_features import clip_inputs, seamless_m4t_features

# Sample counts around the frame grid (400-sample frames every 160): even and odd frame counts,
# a sample short of / exactly at a frame boundary, and long clips.
LENGTHS = [560, 720, 881, 1039, 1040, 16000, 16161, 28001, 48000, 160000]


def _clips(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    clips = []
    for n in LENGTHS:
        t = np.arange(n) / 16000
        tone = np.sin(2 * np.pi * rng.uniform(100, 4000) * t) * rng.uniform(0.05, 0.9)
        clips.append((tone + rng.normal(0, rng.uniform(1e-3, 0.2), n)).astype(np.float32))
    return clips


def _reference_rows(extractor, wave: np.ndarray, **options) -> np.ndarray:
    """The extractor's own output for the clip alone, the rows its attention mask marks real."""
    output = extractor(wave, sampling_rate=extractor.sampling_rate, return_attention_mask=True, **options)
    rows = np.asarray(output[extractor.model_input_names[0]][0])
    mask = output.get("attention_mask")
    return rows if mask is None else rows[np.asarray(mask[0]).astype(bool)]


def test_w2v_bert_filterbanks_equal_the_extractor(tiny_speech_model):
    extractor = AutoFeatureExtractor.from_pretrained(tiny_speech_model)
    assert type(extractor).__name__ == "SeamlessM4TFeatureExtractor"  # the vectorized path is taken
    clips = _clips()
    for wave, fast in zip(clips, clip_inputs(extractor, clips), strict=True):
        # Log-mels before normalization: the same float64 arithmetic, rounded to float32 once.
        log_mel = seamless_m4t_features(extractor, wave, normalize=False)
        reference = _reference_rows(extractor, wave, do_normalize_per_mel_bins=False)
        assert log_mel.shape == reference.shape, len(wave)
        np.testing.assert_allclose(log_mel, reference, rtol=1e-6, atol=1e-6)
        # Normalized: a last-bit difference of a log-mel (~2e-6 at 20) is divided by the bin's
        # standard deviation over the clip, small for a steady tone, so ~1e-4 differences remain.
        np.testing.assert_allclose(fast, _reference_rows(extractor, wave), rtol=0, atol=1e-3)


def test_other_extractors_are_called_as_they_are(layer_norm_hubert):
    extractor = AutoFeatureExtractor.from_pretrained(layer_norm_hubert)
    clips = _clips(seed=1)
    for wave, fast in zip(clips, clip_inputs(extractor, clips), strict=True):
        np.testing.assert_array_equal(fast, _reference_rows(extractor, wave))


def test_padding_keeps_only_the_rows_the_extractor_marks_real(tiny_speech_model):
    # 720 samples = 3 frames: the extractor pads to 4 and masks the half-padded second row.
    extractor = AutoFeatureExtractor.from_pretrained(tiny_speech_model)
    clips = _clips()
    odd, long = clips[1], clips[5]
    batch = pad_waveforms(extractor, [odd, long])
    assert batch["attention_mask"][0].sum().item() == _reference_rows(extractor, odd).shape[0] == 1
    assert batch["attention_mask"][1].sum().item() == _reference_rows(extractor, long).shape[0]


def test_a_clip_shorter_than_two_frames_is_refused(tiny_speech_model):
    extractor = AutoFeatureExtractor.from_pretrained(tiny_speech_model)
    with pytest.raises(ValueError, match="shorter than two"):
        clip_inputs(extractor, [np.zeros(559, dtype=np.float32)])
