"""Curated clips + their documents -> training pairs.

A curated clip is a query without a document: what makes it a training pair (a translation, a
summary, the article it discusses) comes from elsewhere, keyed by the clip's ``id``. This writes
each shard again with ``document`` (and ``query``, the transcription, when given) from a JSON Lines
file of ``{"id", "document", "query"?}``; clips without one are left out and counted.

    python -m datamodules.curation.join --shards CURATED/shards --pairs pairs.jsonl --output PAIRS
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from datamodules.sources import json_lines
from errors import DataError


def join_documents(shards: Path, pairs: Path, output: Path) -> dict:
    """Writes ``output/<shard>`` for each shard; returns ``{"rows_in", "rows_out", "without_document"}``."""
    texts: dict[str, dict] = {}
    for number, row in json_lines(pairs):
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("id"), str)
            or not isinstance(row.get("document"), str)
        ):
            raise DataError(f"{pairs}:{number}: need an object with string 'id' and 'document'.")
        texts[row["id"]] = row
    with_query = any("query" in row for row in texts.values())
    output.mkdir(parents=True, exist_ok=True)
    counts = {"rows_in": 0, "rows_out": 0, "without_document": 0}
    for shard in sorted(Path(shards).glob("*.parquet")):
        source = pq.ParquetFile(shard)
        partial = output / f".{shard.name}.partial"
        writer = None
        for batch in source.iter_batches(batch_size=64):  # a row group's worth of clips at a time
            ids = batch.column("id").to_pylist()
            keep = [i for i, clip in enumerate(ids) if clip in texts]
            counts["rows_in"] += len(ids)
            counts["without_document"] += len(ids) - len(keep)
            if not keep:
                continue
            table = pa.Table.from_batches([batch]).take(keep)
            table = table.append_column("document", pa.array([texts[ids[i]]["document"] for i in keep]))
            if with_query:  # the given transcriptions replace an ASR model's
                if "query" in table.column_names:
                    table = table.drop_columns(["query"])
                table = table.append_column(
                    "query", pa.array([texts[ids[i]].get("query") for i in keep], pa.string())
                )
            writer = writer or pq.ParquetWriter(partial, table.schema)
            writer.write_table(table)
            counts["rows_out"] += len(keep)
        if writer is not None:
            writer.close()
            os.replace(partial, output / shard.name)
    return counts


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.curation.join", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--shards", required=True, help="The curation's shards/ folder.")
    parser.add_argument("--pairs", required=True, help='JSON Lines of {"id", "document", "query"?} per clip.')
    parser.add_argument(
        "--output", required=True, help="Folder of the joined shards (what data.train_data reads)."
    )
    parsed = parser.parse_args(args)
    print(json.dumps(join_documents(Path(parsed.shards), Path(parsed.pairs), Path(parsed.output))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
