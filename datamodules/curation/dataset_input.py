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
import os
import re
import tempfile
from pathlib import Path

from datamodules.curation.config import DATASET_PREFIX as PREFIX
from errors import ConfigError, InputError

log = logging.getLogger(__name__)
FOLDER = "inputs"
# libsndfile's names for the formats it reads, as file endings.
SUFFIXES = {"WAV": ".wav", "WAVEX": ".wav", "FLAC": ".flac", "OGG": ".ogg", "MP3": ".mp3", "AIFF": ".aiff"}
UNKNOWN_SUFFIX = ".audio"


def dataset_name(source: str) -> str | None:
    """The dataset ``curation.input`` names, or None where it names a folder or file."""
    return source[len(PREFIX) :] if source.startswith(PREFIX) else None


def export_recordings(config, folder: Path) -> list[str]:
    """Writes each row's recording under ``folder`` (those not written yet); returns their names."""
    from datasets import Audio, load_dataset

    name = dataset_name(config.input)
    try:
        dataset = load_dataset(name, split=config.input_split, streaming=True)
    except Exception as error:  # noqa: BLE001 - hub, file and split errors all end here
        raise InputError(
            f"curation.input={config.input!r}: the dataset could not be opened "
            f"({type(error).__name__}: {error}). Give a hub name or a local dataset folder after "
            f"'{PREFIX}', and curation.input_split (now {config.input_split!r}) one of its splits."
        ) from error
    column, id_column = config.input_audio_column, config.input_id_column
    columns = list(dataset.features or {}) or None
    for key, wanted in (("input_audio_column", column), ("input_id_column", id_column)):
        if wanted is not None and columns is not None and wanted not in columns:
            raise ConfigError(f"curation.{key}={wanted!r}: the dataset has no such column ({columns}).")
    if dataset.features is not None and isinstance(dataset.features[column], Audio):
        dataset = dataset.cast_column(column, Audio(decode=False))

    folder.mkdir(parents=True, exist_ok=True)
    names, seen = [], {}
    for index, row in enumerate(dataset):
        for key, wanted in (("input_audio_column", column), ("input_id_column", id_column)):
            if wanted is not None and wanted not in row:  # a dataset without declared features
                raise ConfigError(f"curation.{key}={wanted!r}: row {index} has no such column ({list(row)}).")
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
            _write_atomically(path, data)
        names.append(path.name)
    log.info("%s: %d recordings under %s", config.input, len(names), folder)
    return names


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


def _write_atomically(path: Path, data: bytes) -> None:
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
