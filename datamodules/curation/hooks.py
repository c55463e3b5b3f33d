"""The optional stages: speaker diarization (pyannote.audio), speech separation (ONNX), ASR.

Each runs only when configured, on one candidate segment at a time (at most ``max_duration``
seconds at 16 kHz), so memory stays bounded on any recording; unconfigured, it is skipped and the
manifest says so. A configured stage that cannot load fails at start-up, naming the key.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from datamodules.curation.vad import VAD_RATE
from errors import ConfigError


class Diarizer:
    """A pyannote.audio speaker-diarization pipeline, by hub name or local folder/file."""

    def __init__(self, name: str):
        try:
            from pyannote.audio import Pipeline
        except ImportError as error:
            raise ConfigError(
                f"curation.diarization={name!r} needs pyannote.audio: pip install pyannote.audio, "
                "or leave diarization unset to skip this stage."
            ) from error
        try:
            self.pipeline = Pipeline.from_pretrained(name)
        except Exception as error:
            raise ConfigError(f"curation.diarization={name!r} could not be loaded ({error}).") from error
        if self.pipeline is None:  # pyannote returns None for a gated model without a token
            raise ConfigError(
                f"curation.diarization={name!r} could not be loaded (gated, or no such pipeline)."
            )

    def main_speaker_share(self, samples_16k: np.ndarray) -> tuple[int, float]:
        """(speakers heard, share of the speech time held by the one who speaks most)."""
        result = self.pipeline({"waveform": torch.from_numpy(samples_16k)[None], "sample_rate": VAD_RATE})
        annotation = getattr(result, "speaker_diarization", result)  # pyannote 4 wraps it
        seconds: dict[str, float] = {}
        for turn, _, speaker in annotation.itertracks(yield_label=True):
            seconds[speaker] = seconds.get(speaker, 0.0) + turn.duration
        total = sum(seconds.values())
        return len(seconds), (max(seconds.values()) / total if total else 0.0)


class Separator:
    """An ONNX speech separator: input float32 ``[1, samples]`` at 16 kHz, output ``[1, sources,
    samples]`` (or ``[1, samples]``); the first source is taken as the speech."""

    def __init__(self, path: str):
        try:
            import onnxruntime
        except ImportError as error:
            raise ConfigError(
                f"curation.separation={path!r} needs onnxruntime: pip install onnxruntime, or leave "
                "separation unset to skip this stage."
            ) from error
        if not Path(path).is_file():
            raise ConfigError(f"curation.separation={path!r}: no such file.")
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as error:
            raise ConfigError(
                f"curation.separation={path!r} is not a loadable ONNX model ({error})."
            ) from error
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, samples_16k: np.ndarray) -> np.ndarray:
        out = np.asarray(self.session.run(None, {self.input_name: samples_16k.astype(np.float32)[None]})[0])
        speech = out[0, 0] if out.ndim == 3 else out[0]
        return speech[: len(samples_16k)].astype(np.float32)


class Transcriber:
    """An ASR model through transformers' ``pipeline("automatic-speech-recognition")`` (a hub name or
    a local folder): the transcription of each kept clip becomes its ``query``."""

    def __init__(self, name: str):
        from transformers import pipeline

        try:
            self.pipeline = pipeline("automatic-speech-recognition", model=name, device=-1)
        except Exception as error:
            raise ConfigError(f"curation.asr_model={name!r} could not be loaded ({error}).") from error

    def __call__(self, samples_16k: np.ndarray) -> str:
        return self.pipeline({"raw": samples_16k, "sampling_rate": VAD_RATE})["text"].strip()


def stage_lines(config) -> dict[str, str]:
    """What the manifest says about each optional stage."""
    return {
        "diarization": (
            f"pyannote pipeline {config.diarization!r}: segments whose main speaker holds less than "
            f"{config.min_main_speaker_share} of the speech dropped"
            if config.diarization
            else "skipped: no curation.diarization configured"
        ),
        "separation": (
            f"ONNX separator {config.separation!r}: the written audio is its first source"
            if config.separation
            else "skipped: no curation.separation configured"
        ),
        "transcription": (
            f"ASR model {config.asr_model!r} wrote the query column"
            if config.asr_model
            else "skipped: no curation.asr_model configured (no query column)"
        ),
    }
