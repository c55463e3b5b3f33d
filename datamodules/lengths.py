"""A training row's length, for grouping rows of similar length into a batch (``group_by_length``).

Read from what the row already holds, before any decoding: a clip's duration from its audio
header (soundfile reads no samples), a text's length in characters (tokens follow characters
closely enough to group by). A row whose length cannot be read counts as 0; the batch builder
skips and names it as usual when it is really unusable.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from datamodules.audio import audio_file


def clip_seconds(
    row: dict, column: str, base_dir: Path | Sequence[Path] | None = None, allow_outside_paths: bool = False
) -> float:
    """Duration of the row's audio in seconds (0.0 if its header cannot be read); relative paths
    start at ``base_dir`` and stay in it unless ``allow_outside_paths``."""
    import soundfile

    value = row.get(column)
    if isinstance(value, dict) and "array" in value:  # already decoded upstream
        return len(value["array"]) / float(value["sampling_rate"])
    try:
        info = soundfile.info(audio_file(value, base_dir, allow_outside_paths))
    except Exception:  # BadAudio (no usable cell), or soundfile's several types for corrupt data
        return 0.0
    return info.frames / float(info.samplerate)


def text_length(row: dict, column: str) -> float:
    """Characters of the row's text in ``column`` (0.0 when missing)."""
    value = row.get(column)
    return float(len(value)) if isinstance(value, str) else 0.0
