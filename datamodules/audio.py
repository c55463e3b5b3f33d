"""Audio in: decode with soundfile, down-mix, resample with torchaudio, check, pad with a frame mask.

``datasets``' own Audio decoder needs torchcodec + FFmpeg, which a fresh machine lacks, so audio
columns are read undecoded (``Audio(decode=False)``: ``{"bytes", "path"}``) and decoded here.
Every way a clip can be unusable raises ``BadAudio`` with a short reason; the batch builders
turn that into a counted, named skip instead of a crash.
"""

from __future__ import annotations

import functools
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from datamodules.fast_features import clip_inputs
from errors import ConfigError

log = logging.getLogger(__name__)
TRUNCATED_CHOICES = ("skip", "keep")
DEFAULT_SILENCE_THRESHOLD_DBFS = -60.0


class BadAudio(ValueError):
    """A clip that cannot be used; ``str(error)`` is the reason given in the skip warning, ``kind``
    the short name it is counted under in the skip summary (e.g. ``silent``)."""

    def __init__(self, reason: str, kind: str = "bad audio"):
        super().__init__(reason)
        self.kind = kind


class TruncatedAudio(BadAudio):
    """A clip whose file holds fewer samples than its header promises (cut off); carries the
    samples that are there, for ``AudioSettings.truncated: keep``."""

    def __init__(self, reason: str, samples: np.ndarray, rate: int):
        super().__init__(reason, kind="truncated audio")
        self.samples = samples
        self.rate = rate


@dataclass
class AudioSettings:
    """Where the audio is and which clips are kept."""

    feature_extractor: str
    """Feature extractor name or folder (the speech model's own); sets the sample rate and normalization."""
    column: str = "audio"
    """Column (or eval-set query field) holding the audio: {bytes, path}, raw bytes, or a file path."""
    min_duration: float = 3.0
    """Training clips shorter than this many seconds are skipped (the paper keeps 3-30 s)."""
    max_duration: float = 30.0
    """Training clips longer than this many seconds are skipped."""
    allow_outside_paths: bool = False
    """Read audio paths of local training files and eval sets that lead outside their folder (an
    absolute path elsewhere, '..', or a symlink to elsewhere, checked after resolving symlinks);
    false: such rows are skipped (eval queries left out) and named."""
    truncated: Literal["skip", "keep"] = "skip"
    """A clip whose file holds less audio than its header promises (a cut-off copy), in training
    and eval sets: 'skip' it (named and counted as bad audio) or 'keep' the part that is there
    (named in a warning)."""
    silence_threshold_dbfs: float | None = DEFAULT_SILENCE_THRESHOLD_DBFS
    """A clip whose peak sample (of the mono down-mix, in dBFS: 0 is full scale, 1.0) is below
    this level is silent: skipped in training (counted as 'silent') and left out of eval sets,
    named with its level. The peak, not the RMS: speech with long pauses, or recorded quietly,
    keeps a clear peak while its RMS sinks, and dithered or hissing silence stays far below
    -60 dBFS. null: only all-zero clips are silent."""

    def __post_init__(self):
        if not 0 <= self.min_duration < self.max_duration:
            raise ConfigError(
                f"data.audio: need 0 <= min_duration < max_duration, got {self.min_duration} "
                f"and {self.max_duration} seconds."
            )
        if self.truncated not in TRUNCATED_CHOICES:
            raise ConfigError(
                f"data.audio.truncated={self.truncated!r}: use one of {list(TRUNCATED_CHOICES)}."
            )
        if self.silence_threshold_dbfs is not None and not self.silence_threshold_dbfs <= 0:
            raise ConfigError(
                f"data.audio.silence_threshold_dbfs={self.silence_threshold_dbfs}: a level in dBFS is at "
                "most 0 (full scale), e.g. -60; null switches the level check off."
            )


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path``, symlinks resolved, lies in ``folder`` (symlinks resolved too)."""
    real, base = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, base]) == base


def _local_file(path: Path, base_dir: Path | Sequence[Path] | None, allow_outside_paths: bool) -> Path:
    """The file an audio path names: relative to the first of the ``base_dir`` folders that holds
    it, and inside that folder unless ``allow_outside_paths``; an absolute path must lie in the
    first folder (the data's own: a working directory of / would otherwise admit any file).
    Without ``base_dir`` (a hub dataset) the path is taken as it is."""
    if base_dir is None:
        candidates, allowed = [path], [True]
    else:
        folders = [Path(base_dir)] if isinstance(base_dir, (str, Path)) else [Path(f) for f in base_dir]
        if path.is_absolute():
            folders = folders[:1]
        candidates = [path if path.is_absolute() else folder / path for folder in folders]
        allowed = [
            allow_outside_paths or _inside(candidate, folder)
            for candidate, folder in zip(candidates, folders, strict=True)
        ]
    found = next((c for c, ok in zip(candidates, allowed, strict=True) if ok and c.exists()), None)
    if found is not None:
        return found
    if not allowed[0]:  # the file itself is never opened: nothing of it is shown
        raise BadAudio(
            f"audio path {str(path)!r} resolves outside {folders[0]} (an absolute path elsewhere, '..' "
            "or a symlink); set data.audio.allow_outside_paths: true to read it",
            kind="audio path outside the data folder",
        )
    raise BadAudio(f"audio file {candidates[0]} not found", kind="audio file not found")


def audio_file(
    value, base_dir: Path | Sequence[Path] | None = None, allow_outside_paths: bool = False
) -> io.BytesIO | Path:
    """What soundfile opens for an undecoded audio cell: its bytes, or its file (``BadAudio`` if none).

    A relative path starts at ``base_dir``, or at the first of several folders that holds it, and
    must stay in that folder unless ``allow_outside_paths`` (see ``_local_file``).
    """
    if value is None:
        raise BadAudio("no audio", kind="missing audio")
    source = value
    if isinstance(value, dict):
        # Bytes first, even empty ones: b"" is an empty clip, not a cue to look for the path.
        source = value["bytes"] if value.get("bytes") is not None else value.get("path")
        if source is None:
            raise BadAudio("audio cell has neither bytes nor path", kind="missing audio")
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise BadAudio("empty audio (0 bytes)", kind="empty audio")
        return io.BytesIO(bytes(source))
    if isinstance(source, (str, Path)):
        return _local_file(Path(source), base_dir, allow_outside_paths)
    raise BadAudio(f"audio cell of type {type(source).__name__}", kind="missing audio")


def _wav_declared_frames(handle: io.BytesIO | Path) -> int | None:
    """Frames a RIFF WAV header declares in its data chunk; None for other formats, or a size left
    unset (0 or 0xFFFFFFFF, as streaming writers leave it). libsndfile counts only the frames that
    are there, so this is how a cut-off WAV shows."""
    stream = open(handle, "rb") if isinstance(handle, Path) else handle  # closed below
    try:
        stream.seek(0)
        if stream.read(4) != b"RIFF" or not stream.read(4) or stream.read(4) != b"WAVE":
            return None
        block_align = None
        while len(header := stream.read(8)) == 8:
            chunk, size = header[:4], int.from_bytes(header[4:], "little")
            if chunk == b"data":
                return size // block_align if block_align and size not in (0, 0xFFFFFFFF) else None
            body = stream.read(size + size % 2)  # chunks are padded to an even size
            if chunk == b"fmt " and len(body) >= 14:
                block_align = int.from_bytes(body[12:14], "little")
        return None
    finally:
        if stream is handle:
            stream.seek(0)
        else:
            stream.close()


def decode_audio(
    value,
    base_dir: Path | Sequence[Path] | None = None,
    allow_outside_paths: bool = False,
    name: str | None = None,
) -> tuple[np.ndarray, int]:
    """``(samples [channels, frames] float32, sample rate)`` from any form an audio cell takes.

    ``name`` (the row id) names audio held as bytes in a reason; a clip holding fewer frames than
    its header promises raises ``TruncatedAudio``, which carries what is there.
    """
    import soundfile

    if isinstance(value, dict) and "array" in value:  # already decoded upstream
        samples = np.asarray(value["array"], dtype=np.float32)
        return np.atleast_2d(samples), int(value["sampling_rate"])
    handle = audio_file(value, base_dir, allow_outside_paths)
    try:
        declared = _wav_declared_frames(handle)
        with soundfile.SoundFile(handle) as sound:
            declared = max(declared or 0, sound.frames)
            samples, rate = sound.read(dtype="float32", always_2d=True), sound.samplerate
    except Exception as error:  # soundfile raises several types for corrupt data
        message = str(error)
        if isinstance(handle, io.BytesIO):  # soundfile names bytes by their object's repr
            message = message.replace(repr(handle), f"bytes of row {name}" if name else "the audio bytes")
        raise BadAudio(
            f"undecodable audio ({type(error).__name__}: {message})", kind="undecodable audio"
        ) from error
    if samples.shape[0] < declared:
        raise TruncatedAudio(
            f"truncated audio: its header promises {declared / rate:.2f} s, only "
            f"{samples.shape[0] / rate:.2f} s are there (data.audio.truncated: skip)",
            samples.T,
            int(rate),
        )
    return samples.T, int(rate)


class AudioLoader:
    """Decoded, mono, resampled, checked waveforms at the speech model's sample rate."""

    def __init__(
        self,
        sampling_rate: int,
        min_duration: float = 0.0,
        max_duration: float | None = None,
        min_samples: int = 1,
        allow_outside_paths: bool = False,
        truncated: str = "skip",
        silence_threshold_dbfs: float | None = DEFAULT_SILENCE_THRESHOLD_DBFS,
    ):
        self.sampling_rate = sampling_rate
        self.allow_outside_paths = allow_outside_paths
        self.truncated = truncated
        """'skip' (a ``BadAudio``) or 'keep' what a cut-off clip holds (named in a warning, counted)."""
        self.truncated_kept = 0
        self.silence_threshold_dbfs = silence_threshold_dbfs
        """Clips whose peak is below this level (dBFS) are silent bad audio; None: all-zero ones only."""
        self.min_duration = min_duration
        self.max_duration = max_duration
        self.min_samples = min_samples
        """Fewest samples (after resampling) the speech model encodes; shorter clips are bad audio."""

    def load(
        self,
        value,
        base_dir: Path | Sequence[Path] | None = None,
        check_duration: bool = True,
        name: str | None = None,
    ) -> np.ndarray:
        """The clip of an audio cell; ``name`` (its row id) names it in reasons and warnings."""
        try:
            samples, rate = decode_audio(value, base_dir, self.allow_outside_paths, name)
        except TruncatedAudio as cut:
            if self.truncated != "keep":
                raise
            samples, rate = cut.samples, cut.rate
            self.truncated_kept += 1
            reason = str(cut).replace("data.audio.truncated: skip", "data.audio.truncated: keep")
            log.warning(
                "Kept the audio of row %r, %s; %d truncated clips kept by this loader",
                name,
                reason,
                self.truncated_kept,
            )
        if samples.size == 0:
            raise BadAudio("empty audio", kind="empty audio")
        if not np.isfinite(samples).all():
            raise BadAudio("NaN or infinite samples", kind="NaN or infinite samples")
        mono = samples.mean(axis=0)
        self._check_level(mono)
        if check_duration:
            seconds = mono.shape[0] / rate
            if seconds < self.min_duration or (self.max_duration is not None and seconds > self.max_duration):
                raise BadAudio(
                    f"duration {seconds:.2f} s outside [{self.min_duration}, {self.max_duration}] s",
                    kind="duration outside data.audio limits",
                )
        if rate != self.sampling_rate:
            with torch.inference_mode():
                mono = _resampler(rate, self.sampling_rate)(torch.from_numpy(mono)).numpy()
        if mono.shape[0] < self.min_samples:
            minimum = self.min_samples
            raise BadAudio(
                f"{mono.shape[0]} samples, fewer than the speech model's minimum {minimum}",
                kind="too short for the speech model",
            )
        return mono

    def _check_level(self, mono: np.ndarray) -> None:
        """``BadAudio`` (kind ``silent``) for an all-zero clip, or one whose peak is below the threshold."""
        peak = float(np.abs(mono).max())
        if peak == 0:
            raise BadAudio("silent: all-zero audio", kind="silent")
        threshold = self.silence_threshold_dbfs
        level = 20 * np.log10(peak)
        if threshold is not None and level < threshold:
            raise BadAudio(
                f"silent: peak {level:.1f} dBFS below data.audio.silence_threshold_dbfs={threshold:g}",
                kind="silent",
            )


@functools.lru_cache(maxsize=16)
def _resampler(source_rate: int, target_rate: int):
    """torchaudio's band-limited sinc resampler, its kernel built once per pair of rates
    (``torchaudio.functional.resample`` rebuilds it for every clip)."""
    import torchaudio

    return torchaudio.transforms.Resample(source_rate, target_rate)


def pad_waveforms(feature_extractor, waveforms: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """The speech model's input, right-padded with zeros, and its ``attention_mask [B, T]``.

    Waveform models (HuBERT, wav2vec2) take ``input_values [B, samples]``; filterbank models
    (w2v-BERT 2.0) take ``input_features [B, frames, features]``: whichever the feature extractor
    names first. Each clip goes through the feature extractor alone, so its normalization (zero
    mean, unit variance over its own samples or frames) does not depend on the batch;
    ``clip_inputs`` computes w2v-BERT's filterbanks vectorized (the extractor loops over frames).
    """
    key = feature_extractor.model_input_names[0]
    rows = [torch.as_tensor(row, dtype=torch.float32) for row in clip_inputs(feature_extractor, waveforms)]
    longest = max(row.shape[0] for row in rows)
    values = torch.zeros(len(rows), longest, *rows[0].shape[1:])
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, row in enumerate(rows):
        values[i, : row.shape[0]] = row
        mask[i, : row.shape[0]] = 1
    return {key: values, "attention_mask": mask}
