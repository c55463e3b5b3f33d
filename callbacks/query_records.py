"""Per-query records a model collects in ``predict`` (transcripts, units), written once per eval set.

Each rank collects ``{eval set: {query position: value}}``; ``write_query_records`` gathers them
and rank 0 writes ``<run>/<folder>/<eval set>.queries.jsonl``, one JSON line per query in the set's
order, built by ``record(query row, value)``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import collectives

log = logging.getLogger(__name__)


def write_query_records(
    trainer,
    collected: Mapping[str, Mapping[int, object]],
    folder: str,
    record: Callable[[dict, object], dict],
) -> None:
    gathered = collectives.gather_objects(collected)
    if not trainer.is_global_zero:
        return
    directory = Path(trainer.default_root_dir) / folder
    directory.mkdir(parents=True, exist_ok=True)
    for name, eval_set in (getattr(trainer.datamodule, "eval_sets", {}) or {}).items():
        values = {index: value for part in gathered for index, value in part.get(name, {}).items()}
        if not values:
            continue
        path = directory / f"{name}.queries.jsonl"
        with open(path, "w", encoding="utf-8") as handle:
            for index in sorted(values):
                handle.write(
                    json.dumps(record(eval_set.queries[index], values[index]), ensure_ascii=False) + "\n"
                )
        log.info("Wrote the %s of %d %s queries to %s.", folder, len(values), name, path)
