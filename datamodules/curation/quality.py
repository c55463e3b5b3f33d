"""Per-segment quality: DNSMOS when its ONNX model is given, else a signal-quality proxy.

The proxy, from what the VAD pass already holds (no second model):
- ``snr_db``: mean energy of the segment's speech windows (Silero probability >= vad_threshold)
  against the noise floor, the median energy of the non-speech windows (probability below the exit
  threshold) within ``vad.NOISE_CONTEXT_SECONDS`` (30 s) of the segment; a segment with no pause nearby falls
  back to the 10th percentile of its own windows' energies (the gaps between words). Clamped to
  [-20, 80] dB: digital silence has no floor to measure.
- ``clipping``: share of the segment's samples at full scale (|x| >= 0.999), at the source's rate.
- ``speech_ratio``: share of the segment's windows that Silero calls speech.
Dropped when ``snr_db < min_snr_db`` (default 15 dB: speech over a noise floor more than 30x
weaker in power), ``clipping > max_clipping`` (0.1 %) or ``speech_ratio < min_speech_ratio`` (0.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datamodules.curation.vad import VAD_RATE, WINDOW_SECONDS, VadTrack, noise_floor
from errors import ConfigError

SNR_RANGE_DB = (-20.0, 80.0)
FULL_SCALE = 0.999
TINY_ENERGY = 1e-12


@dataclass
class ProxyScores:
    snr_db: float
    speech_ratio: float
    vad_confidence: float
    """Mean Silero probability over the segment's windows."""


def proxy_scores(
    vad: VadTrack, start: float, end: float, threshold: float, neg_threshold: float
) -> ProxyScores:
    """The SNR estimate, speech ratio and mean speech probability of ``[start, end)`` seconds."""
    first, last = (
        int(start / WINDOW_SECONDS),
        max(int(start / WINDOW_SECONDS) + 1, int(np.ceil(end / WINDOW_SECONDS))),
    )
    probabilities, energies = vad.probabilities[first:last], vad.energies[first:last].astype(np.float64)
    speech = probabilities >= threshold
    speech_energy = float(energies[speech].mean()) if speech.any() else float(energies.mean())
    noise = noise_floor(vad, first, last, neg_threshold)
    if noise is None:
        noise = float(np.percentile(energies, 10))
    ratio = max(speech_energy - noise, TINY_ENERGY) / max(noise, TINY_ENERGY)
    snr = float(np.clip(10 * np.log10(ratio), *SNR_RANGE_DB))
    return ProxyScores(snr, float(speech.mean()), float(probabilities.mean()))


def clipping_ratio(samples: np.ndarray) -> float:
    """Share of samples at full scale."""
    return float(np.mean(np.abs(samples) >= FULL_SCALE)) if len(samples) else 0.0


class Dnsmos:
    """Microsoft's DNSMOS P.835 (``sig_bak_ovr.onnx`` of the DNS Challenge) as its reference script
    runs it: 9.01 s windows of 16 kHz audio (a shorter clip is repeated to fill one), one hop per
    second, raw scores mapped by the script's polynomials (non-personalized), averaged over windows.
    Returns ``{"dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl"}``."""

    INPUT_SECONDS = 9.01
    POLY_SIG = np.poly1d([-0.08397278, 1.22083953, 0.0052439])
    POLY_BAK = np.poly1d([-0.13166888, 1.60915514, -0.39604546])
    POLY_OVR = np.poly1d([-0.06766283, 1.11546468, 0.04602535])

    def __init__(self, path: str):
        try:
            import onnxruntime
        except ImportError as error:
            raise ConfigError(
                f"curation.dnsmos_model={path!r} needs onnxruntime: pip install onnxruntime, or leave "
                "dnsmos_model unset to filter with the signal-quality proxy."
            ) from error
        if not Path(path).is_file():
            raise ConfigError(f"curation.dnsmos_model={path!r}: no such file.")
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as error:
            raise ConfigError(
                f"curation.dnsmos_model={path!r} is not a loadable ONNX model ({error})."
            ) from error
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, samples_16k: np.ndarray) -> dict[str, float]:
        size = int(self.INPUT_SECONDS * VAD_RATE)
        audio = samples_16k.astype(np.float32)
        while len(audio) < size:
            audio = np.concatenate([audio, audio])
        hops = int(np.floor(len(audio) / VAD_RATE) - self.INPUT_SECONDS) + 1
        raw = []
        for hop in range(max(1, hops)):
            window = audio[hop * VAD_RATE : hop * VAD_RATE + size]
            if len(window) < size:
                continue
            raw.append(self.session.run(None, {self.input_name: window[None]})[0][0][:3])
        sig, bak, ovr = np.mean(np.asarray(raw, dtype=np.float64), axis=0)
        return {
            "dnsmos_sig": float(self.POLY_SIG(sig)),
            "dnsmos_bak": float(self.POLY_BAK(bak)),
            "dnsmos_ovrl": float(self.POLY_OVR(ovr)),
        }


def quality_method(config) -> str:
    """The manifest's line for the filter in use."""
    if config.dnsmos_model:
        return f"dnsmos ({config.dnsmos_model}): overall score >= {config.dnsmos_threshold}"
    return (
        f"proxy: snr_db >= {config.min_snr_db}, clipping <= {config.max_clipping}, "
        f"speech_ratio >= {config.min_speech_ratio} (datamodules/curation/quality.py)"
    )
