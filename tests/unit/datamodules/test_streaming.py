"""ShuffledEpochStream: every row once per epoch, a new order each epoch, exact resume from any row."""

from __future__ import annotations

import json
import random
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datamodules.lengths import text_length
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


@pytest.mark.parametrize("shards", [8, 3])  # ranks split by shard; by row (3 shards, 2 ranks)
def test_ranks_and_dataloader_workers_split_an_epoch_without_overlap(tmp_path, shards):
    from torch.utils.data import DataLoader

    folder = _parquet_folder(tmp_path / "train", 40, shards)
    served = []
    for rank in range(2):
        stream = ShuffledEpochStream(load_stream(folder), block_size=4, passes=1, rank=rank, world_size=2)
        served += _ids(DataLoader(stream, batch_size=None, num_workers=2))
    assert sorted(served) == sorted(f"s{i % shards}-r{i}" for i in range(40))


def test_block_size_must_be_positive(source):
    with pytest.raises(ValueError, match="block_size"):
        ShuffledEpochStream(load_stream(source), block_size=0)


def test_a_stream_without_rows_ends_instead_of_spinning():
    import datasets

    empty = datasets.Dataset.from_list([{"id": "a"}]).to_iterable_dataset().filter(lambda row: False)
    assert _ids(ShuffledEpochStream(empty, passes=None)) == []  # passes=None: forever, if it had rows


# ----- grouped by length: whole batches of similar rows, in random order ---------------------------
ROWS, BLOCK, BATCH = 50, 12, 4  # blocks of 12, 12, 12, 12 and 2 rows: the last batch of an epoch holds 2


def _texts_of_random_lengths(path) -> str:
    rng = random.Random(0)
    rows = [{"id": f"r{i}", "text": "x" * rng.randint(1, 400)} for i in range(ROWS)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _grouped(source, **kwargs) -> ShuffledEpochStream:
    length_of = partial(text_length, column="text")
    return ShuffledEpochStream(
        load_stream(source), seed=2, block_size=BLOCK, length_of=length_of, batch_size=BATCH, **kwargs
    )


def _batches(stream, limit=None) -> list[list[str]]:
    batches = []
    for batch in stream:
        batches.append([row["id"] for row in batch])
        if limit is not None and len(batches) == limit:
            break
    return batches


def test_grouped_blocks_serve_every_row_once_in_batches_of_neighbouring_lengths(tmp_path):
    source = _texts_of_random_lengths(tmp_path / "train.jsonl")
    lengths = {row["id"]: len(row["text"]) for row in map(json.loads, open(source))}
    batches = _batches(_grouped(source, passes=2))
    per_epoch = len(batches) // 2
    assert [len(b) for b in batches] == ([BATCH] * 12 + [2]) * 2  # per epoch: 4 full blocks, then 2 rows
    for epoch in (batches[:per_epoch], batches[per_epoch:]):
        ids = [i for batch in epoch for i in batch]
        assert sorted(ids) == sorted(lengths) and len(set(ids)) == ROWS
        for start in range(0, 12, 3):  # the 3 batches of each full block
            block = epoch[start : start + 3]
            assert sorted(i for b in block for i in b) == sorted(ids[start * BATCH : (start + 3) * BATCH])
            # Each batch is a run of the block's length order: their length ranges do not interleave.
            ranges = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in block)
            assert all(low[1] <= high[0] for low, high in zip(ranges, ranges[1:], strict=False))
    # ...while each block serves its batches in random order, not shortest first.
    block_orders = [
        [min(lengths[i] for i in b) for b in epoch[start : start + 3]]
        for epoch in (batches[:per_epoch], batches[per_epoch:])
        for start in range(0, 12, 3)
    ]
    assert any(order != sorted(order) for order in block_orders)
    padded = sum(BATCH * max(lengths[i] for i in b) for b in batches[:12])
    plain = _ids(ShuffledEpochStream(load_stream(source), seed=2, block_size=BLOCK, passes=1))[:48]
    plain_padded = sum(BATCH * max(lengths[i] for i in plain[k : k + BATCH]) for k in range(0, 48, BATCH))
    real = sum(lengths[i] for i in plain)  # the same 48 rows (the first 4 blocks) either way
    assert padded - real < 0.5 * (plain_padded - real)  # the point of it: less padding


@pytest.mark.parametrize("stop_after", [1, 3, 5, 12, 13, 15])  # in / at the end of a block, epoch 2
def test_a_grouped_stream_resumes_after_any_batch(tmp_path, stop_after):
    source = _texts_of_random_lengths(tmp_path / "train.jsonl")
    uninterrupted = _batches(_grouped(source, passes=2))
    first = _grouped(source, passes=2)
    seen = _batches(first, limit=stop_after)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = _grouped(source, passes=2)
    resumed.load_state_dict(state)
    assert seen + _batches(resumed) == uninterrupted


def test_ddp_ranks_step_through_batches_of_similar_lengths(tmp_path):
    """Each rank serves its k-th shortest batch of a block at the same step: a DDP step waits for
    the slowest rank, so the ranks' lengths should rise and fall together."""
    rng = random.Random(1)
    folder = tmp_path / "train"
    folder.mkdir()
    for shard in range(4):
        texts = ["x" * rng.randint(1, 400) for _ in range(48)]
        ids = [f"s{shard}-r{i}" for i in range(48)]
        pq.write_table(pa.table({"id": ids, "text": texts}), folder / f"train-{shard:05d}-of-00004.parquet")
    per_rank = [
        list(_grouped(str(folder), passes=1, rank=rank, world_size=2)) for rank in range(2)
    ]  # 96 rows per rank: 8 blocks of 3 batches
    means = [[sum(len(row["text"]) for row in b) / len(b) for b in batches] for batches in per_rank]
    assert len(means[0]) == len(means[1]) == 24
    assert not {row["id"] for b in per_rank[0] for row in b} & {row["id"] for b in per_rank[1] for row in b}
    correlation = float(np.corrcoef(means[0], means[1])[0, 1])
    assert correlation > 0.7, correlation  # measured 0.90; with each rank's own order -0.02
    # What a DDP step costs: the longer of the ranks' padded batches, against their mean.
    longest = [[max(len(row["text"]) for row in b) for b in batches] for batches in per_rank]
    waiting = sum(map(max, *longest)) / (sum(map(sum, longest)) / 2)
    assert waiting < 1.15, waiting  # measured 1.09; with each rank's own order 1.25
