"""Reading a recording of any length in bounded blocks: mono, resampled, never whole.

soundfile (libsndfile) decodes wav/flac/ogg/opus/mp3 and seeks; ``datasets``' decoder is not used
(it needs torchcodec + FFmpeg). A recording that cannot be used raises ``BadAudio`` with the
``kind`` it is counted under in the manifest.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from datamodules.audio import BadAudio, _resampler, _wav_declared_frames

# Input samples each side of a block that the resampler's kernel reaches (torchaudio's sinc kernel
# is under 40 input samples wide for any rate down to 16 kHz from 96 kHz): a block's outputs that
# far from its edges equal those of resampling the whole file, so the stream is cut without seams.
RESAMPLE_MARGIN = 256


@dataclass
class RecordingInfo:
    """What a recording's header says, checked."""

    path: Path
    rate: int
    channels: int
    frames: int
    declared_frames: int
    """Frames the WAV header promises (equal to ``frames`` unless the file is cut off)."""
    format: str

    @property
    def seconds(self) -> float:
        return self.frames / self.rate

    @property
    def truncated(self) -> bool:
        return self.declared_frames > self.frames


def inspect(path: Path) -> RecordingInfo:
    """The header of ``path``; ``BadAudio`` (kind ``undecodable``/``empty``) when it cannot be used."""
    import soundfile

    try:
        info = soundfile.info(str(path))
    except Exception as error:  # soundfile raises several types for non-audio or corrupt data
        raise BadAudio(f"undecodable ({type(error).__name__}: {error})", kind="undecodable") from error
    if info.frames <= 0 or info.samplerate <= 0:
        raise BadAudio("0 seconds of audio", kind="empty (0 s)")
    declared = _wav_declared_frames(Path(path)) or 0
    return RecordingInfo(
        Path(path),
        int(info.samplerate),
        int(info.channels),
        int(info.frames),
        max(declared, info.frames),
        info.format,
    )


class StreamResampler:
    """Resamples consecutive blocks of one signal to ``target`` exactly as resampling the whole
    signal at once would (to float rounding): each call resamples the new block with a margin of
    the previous one and returns only outputs whose kernel lay inside the data it saw."""

    def __init__(self, source: int, target: int):
        self.source, self.target = source, target
        g = math.gcd(source, target)
        self.unit_in, self.unit_out = source // g, target // g
        units = math.ceil(RESAMPLE_MARGIN / self.unit_in)
        self.margin_in, self.margin_out = units * self.unit_in, units * self.unit_out
        self.pending = np.zeros(
            0, dtype=np.float32
        )  # input not yet fully resampled (a whole number of units)
        self.started = False

    def __call__(self, block: np.ndarray, last: bool = False) -> np.ndarray:
        if self.source == self.target:
            return block
        data = np.concatenate([self.pending, block])
        usable = len(data) if last else (len(data) // self.unit_in) * self.unit_in
        if usable == 0 or (not last and usable <= 2 * self.margin_in):
            self.pending = data
            return np.zeros(0, dtype=np.float32)
        with torch.inference_mode():
            out = _resampler(self.source, self.target)(torch.from_numpy(data[:usable])).numpy()
        head = self.margin_out if self.started else 0
        if last:
            self.pending = np.zeros(0, dtype=np.float32)
            return out[head:]
        tail = usable * self.unit_out // self.unit_in - self.margin_out
        # The next call restarts two margins back: its first valid output is this call's first invalid one.
        self.pending = data[usable - 2 * self.margin_in :]
        self.started = True
        return out[head:tail]


def mono_blocks(info: RecordingInfo, block_seconds: float, rate: int) -> Iterator[np.ndarray]:
    """The recording, down-mixed to mono and resampled to ``rate``, in blocks of about
    ``block_seconds`` (the last flushes the resampler); memory is one block's, whatever the length."""
    import soundfile

    resample = StreamResampler(info.rate, rate)
    frames = max(1, int(block_seconds * info.rate))
    try:
        with soundfile.SoundFile(str(info.path)) as sound:
            while True:
                block = sound.read(frames, dtype="float32", always_2d=True)
                if len(block) == 0:
                    break
                out = resample(block.mean(axis=1), last=False)
                if len(out):
                    yield out
    except Exception as error:  # a stream corrupt past its header fails here, mid-file
        raise BadAudio(
            f"undecodable past its header ({type(error).__name__}: {error})", kind="undecodable"
        ) from error
    out = resample(np.zeros(0, dtype=np.float32), last=True)
    if len(out):
        yield out


def read_span(info: RecordingInfo, start: float, end: float) -> np.ndarray:
    """Mono samples of ``[start, end)`` seconds at the recording's own rate (a seek, not a scan)."""
    import soundfile

    first = max(0, int(round(start * info.rate)))
    last = min(info.frames, int(round(end * info.rate)))
    with soundfile.SoundFile(str(info.path)) as sound:
        sound.seek(first)
        block = sound.read(max(0, last - first), dtype="float32", always_2d=True)
    return block.mean(axis=1)


def resample(samples: np.ndarray, source: int, target: int) -> np.ndarray:
    """One clip resampled (whole: a clip is at most ``max_duration`` long)."""
    if source == target:
        return samples
    with torch.inference_mode():
        return _resampler(source, target)(torch.from_numpy(np.ascontiguousarray(samples))).numpy()
