"""ShuffledEpochStream: every row once per epoch, a new order each epoch, exact resume from any row."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datamodules.sources import load_stream
from datamodules.streaming import ShuffledEpochStream


def _parquet_folder(root, rows: int, shards: int):
    root.mkdir()
    for shard in range(shards):
        ids = [f"s{shard}-r{i}" for i in range(shard, rows, shards)]
        pq.write_table(pa.table({"id": ids}), root / f"train-{shard:05d}-of-{shards:05d}.parquet")
    return str(root)


def _jsonl(path, rows: int):
    path.write_text("".join(json.dumps({"id": f"r{i}"}) + "\n" for i in range(rows)))
    return str(path)


def _ids(stream, limit=None) -> list[str]:
    ids = []
    for row in stream:
        ids.append(row["id"])
        if limit is not None and len(ids) == limit:
            break
    return ids


@pytest.fixture(params=["jsonl-1-shard", "parquet-4-shards"])
def source(request, tmp_path):
    if request.param == "jsonl-1-shard":
        return _jsonl(tmp_path / "train.jsonl", 23)
    return _parquet_folder(tmp_path / "train", 23, 4)


def test_each_epoch_serves_every_row_once_in_a_new_order(source):
    stream = ShuffledEpochStream(load_stream(source), seed=3, block_size=5, passes=3)
    ids = _ids(stream)
    epochs = [ids[:23], ids[23:46], ids[46:]]
    assert len(ids) == 69 and all(sorted(e) == sorted(epochs[0]) and len(set(e)) == 23 for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert _ids(ShuffledEpochStream(load_stream(source), seed=3, block_size=5, passes=3)) == ids  # seeded


@pytest.mark.parametrize("stop_after", [1, 4, 5, 11, 23, 30])  # inside / at the end of a block, epoch 2
def test_resuming_from_the_state_after_any_row_continues_with_the_next_row(source, stop_after):
    uninterrupted = _ids(ShuffledEpochStream(load_stream(source), seed=1, block_size=5, passes=2))
    first = ShuffledEpochStream(load_stream(source), seed=1, block_size=5, passes=2)
    seen = _ids(first, limit=stop_after)
    state = json.loads(json.dumps(first.state_dict()))  # a checkpoint holds plain data
    resumed = ShuffledEpochStream(load_stream(source), seed=1, block_size=5, passes=2)
    resumed.load_state_dict(state)
    assert seen + _ids(resumed) == uninterrupted


def test_ranks_split_every_epoch_without_overlap(tmp_path):
    folder = _parquet_folder(tmp_path / "train", 24, 4)
    per_rank = [
        _ids(ShuffledEpochStream(load_stream(folder), seed=0, block_size=4, passes=2, rank=r, world_size=2))
        for r in range(2)
    ]
    for epoch in range(2):
        shares = [ids[epoch * 12 : (epoch + 1) * 12] for ids in per_rank]
        assert not set(shares[0]) & set(shares[1])
        assert len(set(shares[0]) | set(shares[1])) == 24


def test_block_size_must_be_positive(source):
    with pytest.raises(ValueError, match="block_size"):
        ShuffledEpochStream(load_stream(source), block_size=0)


def test_a_stream_without_rows_ends_instead_of_spinning():
    import datasets

    empty = datasets.Dataset.from_list([{"id": "a"}]).to_iterable_dataset().filter(lambda row: False)
    assert _ids(ShuffledEpochStream(empty, passes=None)) == []  # passes=None: forever, if it had rows
