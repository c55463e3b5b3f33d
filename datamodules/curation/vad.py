"""Silero-VAD over a stream: a speech probability and an energy per 32 ms window, then regions.

The model is stateful (it carries context from one 512-sample window to the next), so feeding it
the stream window by window gives the probabilities ``silero_vad.get_speech_timestamps`` computes
on the whole file, without the whole file in memory. Two float32 numbers are kept per window
(8 bytes per 32 ms: 0.9 MB per hour of audio, against 230 MB for the audio itself at 16 kHz);
the regions come from Silero's own ``get_speech_timestamps_from_probs``.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

VAD_RATE = 16000
WINDOW = 512  # Silero's window at 16 kHz
WINDOW_SECONDS = WINDOW / VAD_RATE


def load_vad():
    """Silero-VAD's TorchScript model, from the weights inside the ``silero-vad`` package (offline)."""
    threads = torch.get_num_threads()
    try:
        return _import_silero().load_silero_vad()
    finally:  # the caller's setting, also when loading fails (a notebook's training keeps its threads)
        torch.set_num_threads(threads)


def _import_silero():
    import silero_vad  # its import sets torch's threads to 1, process-wide

    return silero_vad


@dataclass
class VadTrack:
    """Per-window speech probabilities and mean-square energies of one recording at 16 kHz."""

    probabilities: np.ndarray
    energies: np.ndarray
    samples: int
    """Samples of the 16 kHz stream (the last window is zero-padded, as Silero pads it)."""

    @property
    def seconds(self) -> float:
        return self.samples / VAD_RATE


def track(model, blocks: Iterable[np.ndarray]) -> VadTrack:
    """Runs the model over consecutive 16 kHz mono blocks, window by window."""
    model.reset_states()
    probabilities, energies = array("f"), array("f")
    carry = np.zeros(0, dtype=np.float32)
    samples = 0

    def run(windows: np.ndarray):
        energies.extend(np.mean(windows.astype(np.float64) ** 2, axis=1).astype(np.float32))
        with torch.inference_mode():
            for window in torch.from_numpy(windows):
                probabilities.append(float(model(window, VAD_RATE)))

    for block in blocks:
        samples += len(block)
        data = np.concatenate([carry, block.astype(np.float32, copy=False)])
        whole = len(data) // WINDOW * WINDOW
        if whole:
            run(data[:whole].reshape(-1, WINDOW))
        carry = data[whole:]
    if len(carry):
        run(np.pad(carry, (0, WINDOW - len(carry)))[None])
    return VadTrack(
        np.frombuffer(probabilities, dtype=np.float32), np.frombuffer(energies, dtype=np.float32), samples
    )


NOISE_CONTEXT_SECONDS = 30.0
END_TRIM_MARGIN_DB = 6.0


def noise_floor(vad: VadTrack, first: int, last: int, neg_threshold: float) -> float | None:
    """Median energy of the non-speech windows (probability below the exit threshold) within
    ``NOISE_CONTEXT_SECONDS`` of windows ``[first, last)``; None when there are none."""
    context = int(NOISE_CONTEXT_SECONDS / WINDOW_SECONDS)
    lo, hi = max(0, first - context), last + context
    quiet = vad.probabilities[lo:hi] < neg_threshold
    return float(np.median(vad.energies[lo:hi][quiet])) if quiet.any() else None


def trim_tail(vad: VadTrack, start: float, end: float, config) -> float:
    """``end`` pulled back over Silero's hangover: its probability stays high for 0.1-0.4 s after
    speech stops (measured on espeak-ng speech, longer over louder noise), so the end moves to the
    last window louder than the local noise floor by ``END_TRIM_MARGIN_DB``, searching at most
    ``end_trim_ms`` back and keeping ``speech_pad_ms``. Silero decides what is speech; this only
    places the end of it."""
    if config.end_trim_ms <= 0:
        return end
    first, last = int(start / WINDOW_SECONDS), min(len(vad.energies), int(np.ceil(end / WINDOW_SECONDS)))
    floor = noise_floor(vad, first, last, config.neg_threshold)
    if floor is None or last <= first:
        return end
    limit = max(first + 1, last - int(config.end_trim_ms / 1000 / WINDOW_SECONDS))
    loud = np.flatnonzero(vad.energies[limit:last] > max(floor, 1e-12) * 10 ** (END_TRIM_MARGIN_DB / 10))
    new_end = (limit + (loud[-1] + 1 if len(loud) else 0)) * WINDOW_SECONDS + config.speech_pad_ms / 1000
    return min(end, max(new_end, start + WINDOW_SECONDS))


def speech_regions(vad: VadTrack, config) -> list[tuple[float, float]]:
    """Silero's speech regions in seconds (regions longer than ``max_duration`` cut at their longest
    pause), each end pulled back over Silero's hangover (``trim_tail``)."""
    from silero_vad import get_speech_timestamps_from_probs

    regions = get_speech_timestamps_from_probs(
        vad.probabilities.tolist(),
        sampling_rate=VAD_RATE,
        threshold=config.vad_threshold,
        neg_threshold=config.neg_threshold,
        min_speech_duration_ms=config.min_speech_ms,
        min_silence_duration_ms=config.min_silence_ms,
        speech_pad_ms=config.speech_pad_ms,
        max_speech_duration_s=config.max_duration,
        audio_length_samples=vad.samples,
    )
    return [
        (r["start"] / VAD_RATE, trim_tail(vad, r["start"] / VAD_RATE, r["end"] / VAD_RATE, config))
        for r in regions
    ]
