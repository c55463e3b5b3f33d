"""The manifest: totals over every recording's done marker (this run's and earlier runs')."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from datamodules.curation.hooks import stage_lines
from datamodules.curation.quality import quality_method
from datamodules.curation.shards import write_json_atomically

HOUR = 3600.0


def read_markers(output: Path) -> list[dict]:
    return [json.loads(path.read_text(encoding="utf-8")) for path in sorted((output / "done").glob("*.json"))]


def build(markers: list[dict], config, this_run: dict) -> dict:
    """Hours in/kept, segments kept and dropped per reason, recordings skipped and why, formats seen."""
    dropped, dropped_seconds, skipped, formats = Counter(), Counter(), Counter(), Counter()
    for marker in markers:
        dropped.update(marker["dropped"])
        dropped_seconds.update(marker["dropped_seconds"])
        if marker["skipped"]:
            skipped[marker["skipped"]["kind"]] += 1
        if marker.get("input_format"):
            formats[marker["input_format"]] += 1
    return {
        "hours_in": sum(m["seconds_in"] for m in markers) / HOUR,
        "hours_speech": sum(m["seconds_speech"] for m in markers) / HOUR,
        "hours_kept": sum(m["seconds_kept"] for m in markers) / HOUR,
        "segments_kept": sum(m["kept"] for m in markers),
        "segments_dropped": dict(dropped),
        "hours_dropped": {reason: seconds / HOUR for reason, seconds in dropped_seconds.items()},
        "recordings": len(markers),
        "recordings_with_clips": sum(1 for m in markers if m["shard"]),
        "recordings_skipped": dict(skipped),
        "skipped_files": [
            {"source": m["source"], "kind": m["skipped"]["kind"], "reason": m["skipped"]["reason"]}
            for m in markers
            if m["skipped"]
        ],
        "notes": [{"source": m["source"], "note": m["note"]} for m in markers if m.get("note")],
        "input_formats": dict(formats),
        "resampled_to_hz": {"vad": 16000, "clips": config.output_sample_rate},
        "quality_method": quality_method(config),
        "optional_stages": stage_lines(config),
        "this_run": this_run,
        "config": config.as_dict(),
    }


def write(output: Path, config, this_run: dict) -> dict:
    manifest = build(read_markers(output), config, this_run)
    write_json_atomically(output / "manifest.json", manifest)
    return manifest
