"""Vectorized speech-model inputs, equal to the model's own feature extractor.

``transformers``' ``SeamlessM4TFeatureExtractor`` (w2v-BERT 2.0's filterbanks) computes its
Kaldi-style log-mel frames in a Python loop, one FFT per 10 ms frame: a 64-clip batch of 2 s
clips takes ~0.8 s of one core, as long as the demo's whole training step, and a 30 s clip
~0.2 s. Here the same arithmetic runs on all frames at once (one strided view, one batched
FFT); ``tests/unit/datamodules/test_fast_features.py`` checks it against the original on
clips of many lengths.
Other extractors (HuBERT / wav2vec2: a normalized waveform) are already cheap and are called
as they are.
"""

from __future__ import annotations

import numpy as np


def seamless_m4t_features(extractor, waveform: np.ndarray, normalize: bool = True) -> np.ndarray:
    """``input_features [frames / stride, num_mel_bins * stride]`` of one clip, as the extractor
    returns them (``normalize``: its ``do_normalize_per_mel_bins``), for the rows its mask marks real."""
    # The extractor's own steps, in its order: 16-bit scale, frames of 400 samples every 160
    # (center=False), DC offset removed, pre-emphasis 0.97, povey window, |rfft(512)|^2 (stored as
    # complex64 first, as the original does), Kaldi mel filters, floor, natural log.
    frame_length, hop_length, fft_length = 400, 160, 512
    samples = np.asarray(waveform, dtype=np.float32).reshape(-1) * (2**15)
    if samples.size < frame_length + hop_length:
        raise ValueError(f"a clip of {samples.size} samples is shorter than two {frame_length}-sample frames")
    num_frames = 1 + (samples.size - frame_length) // hop_length
    frames = np.lib.stride_tricks.sliding_window_view(samples.astype(np.float64), frame_length)
    frames = frames[::hop_length][:num_frames]
    frames = frames - frames.mean(axis=1, keepdims=True)
    emphasized = np.empty_like(frames)
    emphasized[:, 1:] = frames[:, 1:] - 0.97 * frames[:, :-1]
    emphasized[:, 0] = (1 - 0.97) * frames[:, 0]
    emphasized *= extractor.window
    spectrum = np.fft.rfft(emphasized, n=fft_length, axis=1).astype(np.complex64)
    power = np.abs(spectrum, dtype=np.float64) ** 2
    features = np.log(np.maximum(1.192092955078125e-07, power @ extractor.mel_filters)).astype(np.float32)
    if normalize:
        features = (features - features.mean(0, keepdims=True)) / np.sqrt(
            features.var(0, ddof=1, keepdims=True) + 1e-7
        )
    # The extractor pads an odd frame count to even and masks the half-padded stacked row: drop it.
    stride = extractor.stride
    usable = num_frames - num_frames % stride
    return features[:usable].reshape(usable // stride, features.shape[1] * stride)


def _computes_filterbanks(extractor) -> bool:
    """Whether this is w2v-BERT's filterbank extractor, which the vectorized path replaces."""
    return type(extractor).__name__ == "SeamlessM4TFeatureExtractor"


def minimum_samples(extractor) -> int:
    """Shortest clip (at the extractor's rate) the speech model can encode into at least one frame."""
    if _computes_filterbanks(extractor):
        return 560  # two 400-sample frames 160 apart: one stacked row, and a defined variance per bin
    return 400  # the wav2vec2 / HuBERT convolutional front end's receptive field (25 ms at 16 kHz)


def clip_inputs(extractor, waveforms: list[np.ndarray]) -> list[np.ndarray]:
    """The speech model's input for each clip alone (first model input name of the extractor), unpadded."""
    if _computes_filterbanks(extractor):
        return [seamless_m4t_features(extractor, wave) for wave in waveforms]
    key = extractor.model_input_names[0]
    return [np.asarray(extractor(wave, sampling_rate=extractor.sampling_rate)[key][0]) for wave in waveforms]
