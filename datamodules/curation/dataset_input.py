"""Recordings from a ``datasets`` dataset (``--input datasets:NAME``, a hub name or a local
dataset folder): streamed row by row, each recording's bytes written once under
``<output>/inputs/`` and curated from there as a folder is.

The audio column is read undecoded (``Audio(decode=False)``: the stored bytes, or the file a path
names), so neither torchcodec nor FFmpeg is needed and each file keeps the dataset's own encoding
(libsndfile reads it as it reads a folder's). A later run finds the files already written, same
size and time, so the recordings whose done markers exist are skipped as in a folder. A row whose
audio is missing or not audio becomes a file the pipeline counts as ``undecodable`` or ``empty``,
named by the row's id.
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

from datamodules.curation.config import DATASET_PREFIX
from errors import ConfigError, InputError

log = logging.getLogger(__name__)
FOLDER = "inputs"
# libsndfile's names for the formats it reads, as file endings.
SUFFIXES = {"WAV": ".wav", "WAVEX": ".wav", "FLAC": ".flac", "OGG": ".ogg", "MP3": ".mp3", "AIFF": ".aiff"}
UNKNOWN_SUFFIX = ".audio"


def export_recordings(config, folder: Path) -> list[str]:
    """Writes each row's recording under ``folder`` (those not written yet); returns their names."""
    from datasets import Audio, load_dataset

    from callbacks.checkpoint_files import write_atomically

    try:
        dataset = load_dataset(config.input_dataset, split=config.input_split, streaming=True)
    except Exception as error:  # noqa: BLE001 - hub, file and split errors all end here
        raise InputError(
            f"curation.input={config.input!r}: the dataset could not be opened "
            f"({type(error).__name__}: {error}). Give a hub name or a local dataset folder after "
            f"'{DATASET_PREFIX}', and curation.input_split (now {config.input_split!r}) one of its splits."
        ) from error
    column, id_column = config.input_audio_column, config.input_id_column
    if dataset.features is not None:  # declared: checked before anything is written
        _check_columns(config, list(dataset.features), "the dataset")
        if isinstance(dataset.features[column], Audio):
            dataset = dataset.cast_column(column, Audio(decode=False))

    folder.mkdir(parents=True, exist_ok=True)
    names, seen = [], {}
    for index, row in enumerate(dataset):
        _check_columns(config, list(row), f"row {index}")  # a dataset without declared features
        ident = str(row[id_column]) if id_column else f"{index:08d}"
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", ident)[:100] or "recording"
        if stem in seen:
            raise InputError(
                f"curation.input_id_column={id_column!r}: rows {seen[stem]} and {index} both name their "
                f"recording {stem!r} (this one's id: {ident!r}); recordings need distinct ids (null: "
                "name them by row number)."
            )
        seen[stem] = index
        data, suffix = _recording_bytes(row[column], ident)
        path = folder / f"{stem}{suffix}"
        # Written by an earlier run: left as it is (same time), so its done marker still holds.
        if not (path.is_file() and path.stat().st_size == len(data)):
            write_atomically(lambda handle, data=data: handle.write(data), path)
        names.append(path.name)
    log.info("%s: %d recordings under %s", config.input, len(names), folder)
    return names


def _check_columns(config, columns: list[str], where: str) -> None:
    for key in ("input_audio_column", "input_id_column"):
        wanted = getattr(config, key)
        if wanted is not None and wanted not in columns:
            raise ConfigError(f"curation.{key}={wanted!r}: {where} has no such column ({columns}).")


def _recording_bytes(cell, ident: str) -> tuple[bytes, str]:
    """A cell's encoded audio and its file ending; empty bytes where it holds none."""
    if isinstance(cell, dict) and cell.get("array") is not None:  # decoded upstream: float wav, lossless
        import numpy as np
        import soundfile

        buffer = io.BytesIO()
        samples = np.asarray(cell["array"], dtype=np.float32)
        soundfile.write(buffer, samples, int(cell["sampling_rate"]), format="WAV", subtype="FLOAT")
        return buffer.getvalue(), ".wav"
    if isinstance(cell, dict):
        data, path = cell.get("bytes"), cell.get("path")
    elif isinstance(cell, bytes | str):
        data, path = (cell, None) if isinstance(cell, bytes) else (None, cell)
    else:
        data, path = None, None
    if data is None and path:
        try:
            data = Path(path).read_bytes()
        except OSError as error:  # counted by the pipeline as undecodable, under this row's name
            log.warning("Recording %r names %s, which could not be read (%s)", ident, path, error)
            data = b""
    data = data or b""
    suffix = Path(path).suffix.lower() if path else ""
    return data, suffix if suffix in SUFFIXES.values() else _sniffed_suffix(data)


def _sniffed_suffix(data: bytes) -> str:
    import soundfile

    try:
        return SUFFIXES.get(soundfile.info(io.BytesIO(data)).format, UNKNOWN_SUFFIX)
    except Exception:  # noqa: BLE001 - not audio: the pipeline names it undecodable
        return UNKNOWN_SUFFIX
