"""The curation settings: one dataclass, every field on the command line and in a YAML file."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from errors import ConfigError

DATASET_PREFIX = "datasets:"  # curation.input naming a `datasets` dataset (dataset_input.py)

AUDIO_EXTENSIONS = ("wav", "flac", "ogg", "oga", "opus", "mp3", "aiff", "aif")


@dataclass
class CurationConfig:
    """From long recordings to 3-30 s training clips (``python -m datamodules.curation --help``)."""

    input: str
    """A folder of recordings (searched recursively), one audio file, or ``datasets:NAME``: a
    ``datasets`` dataset (hub name or local dataset folder) whose recordings are written once under
    <output>/inputs/ and curated from there."""
    output: str
    """Folder written: shards/ (parquet, what data.train_data reads), done/ (a marker per recording),
    manifest.json."""
    input_split: str = "train"
    """With a ``datasets:`` input: the split read."""
    input_audio_column: str = "audio"
    """With a ``datasets:`` input: the column holding each recording (an Audio feature, or
    ``{bytes, path}``)."""
    input_id_column: str | None = None
    """With a ``datasets:`` input: a column naming each recording, as the manifest and the clips'
    ``source`` will (null: the row number)."""
    extensions: list[str] = field(default_factory=lambda: list(AUDIO_EXTENSIONS))
    """File name endings read as recordings (what libsndfile decodes: wav, flac, ogg/opus, mp3, aiff)."""
    workers: int = 1
    """Recordings processed at once, one process each (one CPU core each)."""
    block_seconds: float = 30.0
    """Seconds of audio read at a time; memory is bounded by this, never by a recording's length."""
    min_duration: float = 3.0
    """Shortest segment kept, in seconds (the paper keeps 3-30 s)."""
    max_duration: float = 30.0
    """Longest segment kept, in seconds; longer speech is cut at its longest pause (mid-speech only
    where it never pauses)."""
    max_pause: float = 1.0
    """A pause longer than this many seconds always ends a segment; shorter ones may sit inside one."""
    vad_threshold: float = 0.5
    """Silero-VAD: a 32 ms window with a speech probability above this starts speech."""
    vad_neg_threshold: float | None = None
    """Silero-VAD: inside speech, a probability below this is silence (null: vad_threshold - 0.15,
    Silero's default)."""
    min_speech_ms: int = 250
    """Silero-VAD: speech shorter than this many milliseconds is ignored."""
    min_silence_ms: int = 100
    """Silero-VAD: a silence shorter than this many milliseconds does not end speech."""
    speech_pad_ms: int = 30
    """Silero-VAD: each speech region is widened by this many milliseconds on both sides."""
    end_trim_ms: int = 400
    """Silero's probability stays high 0.1-0.4 s after speech stops: each end is pulled back, at most
    this far, to the last window above the noise floor (0: Silero's ends as they are)."""
    min_snr_db: float = 15.0
    """Proxy quality: a segment whose estimated SNR (speech vs non-speech windows) is below this is
    dropped."""
    max_clipping: float = 0.001
    """Proxy quality: a segment with more than this share of samples at full scale is dropped."""
    min_speech_ratio: float = 0.5
    """Proxy quality: a segment whose share of speech windows (Silero) is below this is dropped."""
    dnsmos_model: str | None = None
    """DNSMOS ONNX model (sig_bak_ovr.onnx) scoring segments instead of the proxy (needs onnxruntime)."""
    dnsmos_threshold: float = 3.2
    """With dnsmos_model: a segment whose DNSMOS overall score is below this is dropped (the paper's 3.2)."""
    diarization: str | None = None
    """pyannote.audio pipeline name or folder, run on each candidate segment (null: skipped)."""
    min_main_speaker_share: float = 0.8
    """With diarization: a segment whose main speaker holds less than this share of its speech is dropped."""
    separation: str | None = None
    """ONNX speech separator run on each candidate segment (16 kHz in, first source out; null: skipped)."""
    asr_model: str | None = None
    """ASR model (transformers pipeline: hub name or folder) transcribing each kept clip into `query`
    (null: skipped)."""
    output_sample_rate: int = 16000
    """Sample rate of the written clips (mono FLAC); the speech towers read 16 kHz."""
    truncated: Literal["keep", "skip"] = "keep"
    """A WAV holding less audio than its header promises: 'keep' the part that is there (noted in the
    manifest), or 'skip' it (counted as truncated)."""
    rows_per_row_group: int = 16
    """Segments held in memory before they are written to the shard (bounds memory on long recordings)."""
    progress: bool = True
    """Show a progress bar in hours of audio processed."""

    def __post_init__(self):
        def refuse(key: str, why: str):
            raise ConfigError(f"curation.{key}={getattr(self, key)!r}: {why}")

        if not 0 < self.min_duration < self.max_duration:
            refuse("min_duration", f"need 0 < min_duration < max_duration ({self.max_duration}).")
        if self.max_pause <= 0:
            refuse("max_pause", "a pause length in seconds must be positive.")
        if not 0 < self.vad_threshold < 1:
            refuse("vad_threshold", "a probability between 0 and 1.")
        if self.vad_neg_threshold is not None and not 0 < self.vad_neg_threshold <= self.vad_threshold:
            refuse("vad_neg_threshold", "need 0 < vad_neg_threshold <= vad_threshold, or null.")
        if self.workers < 1:
            refuse("workers", "at least 1.")
        if self.block_seconds < 1:
            refuse("block_seconds", "at least 1 second.")
        if not 0 <= self.max_clipping <= 1:
            refuse("max_clipping", "a share between 0 and 1.")
        if not 0 <= self.min_speech_ratio <= 1:
            refuse("min_speech_ratio", "a share between 0 and 1.")
        if self.truncated not in ("keep", "skip"):
            refuse("truncated", "use 'keep' or 'skip'.")
        if self.output_sample_rate < 8000:
            refuse("output_sample_rate", "at least 8000 Hz.")
        if self.input_dataset is None and not Path(self.input).expanduser().exists():
            refuse("input", f"no such file or folder (resolved to {Path(self.input).resolve()}).")
        for key in ("dnsmos_model", "separation"):
            value = getattr(self, key)
            if value is not None and not Path(value).expanduser().is_file():
                refuse(key, "no such ONNX file; give the model's path, or null to skip this stage.")

    @property
    def input_dataset(self) -> str | None:
        """The ``datasets`` dataset ``input`` names, or None where it names a folder or file."""
        return self.input.removeprefix(DATASET_PREFIX) if self.input.startswith(DATASET_PREFIX) else None

    @property
    def neg_threshold(self) -> float:
        """Silero's exit threshold."""
        return (
            self.vad_neg_threshold
            if self.vad_neg_threshold is not None
            else max(self.vad_threshold - 0.15, 0.01)
        )

    def as_dict(self) -> dict:
        return asdict(self)
