"""Parquet shards of clips (one per recording) and the done markers that make a run resumable.

A shard holds ``audio`` as ``{bytes, path}`` (mono FLAC bytes: what ``data.train_data`` decodes),
``id``, ``source``, ``start``, ``end``, ``duration``, the segment's scores, and ``query`` (its
transcription) when an ASR model is configured. It is written to a
temporary name in row groups of ``rows_per_row_group`` clips (memory stays bounded on a long
recording) and renamed when complete; the recording's done marker, written the same way after it,
is what a later run checks: a run stopped mid-recording leaves no marker and redoes that one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCORE_COLUMNS = {
    "snr_db": pa.float32(),
    "clipping": pa.float32(),
    "speech_ratio": pa.float32(),
    "vad_confidence": pa.float32(),
    "dnsmos_sig": pa.float32(),
    "dnsmos_bak": pa.float32(),
    "dnsmos_ovrl": pa.float32(),
    "speakers": pa.int32(),
    "main_speaker_share": pa.float32(),
}
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("audio", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("source", pa.string()),
        ("start", pa.float64()),
        ("end", pa.float64()),
        ("duration", pa.float64()),
        *SCORE_COLUMNS.items(),
    ]
)


def recording_key(relative: str) -> str:
    """A file-name-safe, unique name for a recording: its stem and a hash of its relative path."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(relative).stem)[:60] or "recording"
    return f"{stem}-{hashlib.sha1(relative.encode()).hexdigest()[:10]}"


def flac_bytes(samples: np.ndarray, rate: int) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, np.clip(samples, -1.0, 1.0), rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


class ShardWriter:
    """Rows of one recording into ``<output>/shards/<key>.parquet``, atomically."""

    def __init__(self, shards_dir: Path, key: str, rows_per_row_group: int, with_query: bool = False):
        self.path = shards_dir / f"{key}.parquet"
        self.partial = shards_dir / f".{key}.parquet.partial"  # a dot file: datasets does not read it
        self.rows: list[dict] = []
        self.rows_per_row_group = rows_per_row_group
        self.writer: pq.ParquetWriter | None = None
        self.written = 0
        self.schema = SCHEMA.append(pa.field("query", pa.string())) if with_query else SCHEMA

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.rows_per_row_group:
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.partial, self.schema)
        columns = {name: [row.get(name) for row in self.rows] for name in self.schema.names}
        self.writer.write_table(pa.table(columns, schema=self.schema))
        self.written += len(self.rows)
        self.rows = []

    def close(self) -> str | None:
        """The shard's file name, or None when no clip was kept (no empty shard is written)."""
        self._flush()
        if self.writer is None:
            return None
        self.writer.close()
        os.replace(self.partial, self.path)
        return self.path.name

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.partial.unlink(missing_ok=True)


def write_json_atomically(path: Path, value: dict) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(value, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(partial, path)


def marker_path(output: Path, key: str) -> Path:
    return output / "done" / f"{key}.json"
