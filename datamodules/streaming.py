"""Epochs of a streaming ``datasets.IterableDataset`` in a seeded random order that resumes exactly."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from itertools import count, islice

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

log = logging.getLogger(__name__)


def _worker_id() -> int:
    info = get_worker_info()
    return info.id if info is not None else 0


def _rows(source) -> Iterator[dict]:
    """The rows of a ``datasets.IterableDataset``, read through ``iter()``: in a DataLoader worker,
    its ``__iter__`` would split the shards by worker again (``ShuffledEpochStream.source`` did)."""
    if get_worker_info() is not None:
        import fsspec.asyn

        fsspec.asyn.reset_lock()  # as datasets' own worker iteration does: a forked lock can hang
    for batch in source.iter(batch_size=1):
        yield {column: values[0] for column, values in batch.items()}


class ShuffledEpochStream(IterableDataset):
    """Iterates ``passes`` epochs (``None``: forever), each in a new seeded order, resumable mid-epoch.

    Order of an epoch: the dataset's shards in a seeded permutation, then its rows shuffled
    within consecutive blocks of ``block_size``. Why not ``datasets``' shuffle buffer: its state
    leaves the buffer out, so a resumed run silently drops or reorders up to a buffer of rows.
    Here the state is the source's own position at the start of the current block (``datasets``
    restores that exactly, skipping whole shards) plus how many of the block's rows were served:
    a resume re-reads one block (rows, not decoded audio) and reshuffles it identically.

    ``rank``/``world_size`` split every epoch's shards (or rows) across DDP ranks; DataLoader
    workers split a rank's shards further. ``state_dict`` / ``load_state_dict`` are what
    torchdata's ``StatefulDataLoader`` saves into Lightning checkpoints.

    With ``length_of`` (a picklable ``row -> length``), the stream yields whole batches (lists of
    ``batch_size`` rows) instead of rows: each block is sorted by length (ties in random order),
    cut into batches, and the batches are served in a seeded random order, so a batch pads to
    little more than its own rows while the order of batches stays random (the same order on every
    rank, so DDP ranks step through batches of similar lengths together for as long as their blocks
    line up: in the first epoch, until one rank's shorter last block). A block whose size is
    not a multiple of ``batch_size`` (an epoch's last) also serves one smaller batch. The state then
    counts the block's batches served; a resume recomputes the same batches from the re-read block.

    ``read_error`` (a picklable ``exception -> exception or None``) turns a failure to read the
    source (a broken line deep in a file) into the error to raise instead, naming the file.

    ``transform`` (a picklable ``(row, pass) -> row``) is applied to every row as it is served, e.g.
    to draw its hard negatives for this pass (``datamodules.negatives.NegativeSampler``); being a
    function of the row and the pass, it resumes exactly with the stream.
    """

    def __init__(
        self,
        dataset,
        seed: int = 0,
        block_size: int = 10_000,
        passes: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        length_of: Callable[[dict], float] | None = None,
        batch_size: int | None = None,
        read_error: Callable[[Exception], Exception | None] | None = None,
        transform: Callable[[dict, int], dict] | None = None,
    ):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}.")
        if length_of is not None and (batch_size is None or batch_size < 1):
            raise ValueError(f"grouping by length needs a batch_size >= 1, got {batch_size}.")
        self.length_of = length_of
        self.batch_size = batch_size
        self.read_error = read_error
        self.transform = transform
        self.dataset = dataset
        self.seed = seed
        self.block_size = block_size
        self.passes = passes
        self.rank = rank
        self.world_size = world_size
        self._state = {"epoch": 0, "block": 0, "block_start": None, "served": 0}
        self._resume: dict | None = None

    def source(self, epoch: int):
        """This rank's and DataLoader worker's rows of ``epoch`` in reading order (shards permuted
        per epoch); None where it holds no shard.

        The split by worker is made here rather than left to ``datasets``, which splits by worker
        inside its own ``__iter__``: a state saved in a worker is then that worker's share, yet
        ``load_state_dict`` restores it into the whole dataset before the split (an IndexError on
        resume). Here the dataset a worker restores is the very one whose state it saved.
        """
        from datasets import concatenate_datasets
        from datasets.distributed import split_dataset_by_node

        shards = self.dataset.num_shards
        order = np.random.default_rng([self.seed, epoch]).permutation(shards).tolist() if shards > 1 else [0]
        # Ranks take every world_size-th shard when the shards divide evenly, else every
        # world_size-th row of the shards (datasets' split_dataset_by_node rule).
        by_shard = shards % self.world_size == 0
        if by_shard:
            order = order[self.rank :: self.world_size]
        worker = get_worker_info()
        if worker is not None:
            order = order[worker.id :: worker.num_workers]
        if not order:
            return None
        if shards == 1:
            # A fresh object every epoch: a state loaded into a datasets IterableDataset stays its
            # starting point for every later iteration too.
            source = copy.deepcopy(self.dataset)
        else:
            source = concatenate_datasets([self.dataset.shard(shards, i) for i in order])
        if not by_shard:
            source = split_dataset_by_node(source, rank=self.rank, world_size=self.world_size)
        return source

    def _block_order(self, epoch: int, block: int, rows: list[dict]) -> list:
        """What the block serves, in order: row indices, or index arrays (batches) by length."""
        rng = np.random.default_rng([self.seed, epoch, block, self.rank, _worker_id()])
        order = rng.permutation(len(rows))
        if self.length_of is None:
            return list(order)
        lengths = np.array([self.length_of(rows[i]) for i in order], dtype=np.float64)
        order = order[np.argsort(lengths, kind="stable")]  # equal lengths stay in random order
        batches = [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        # The batch order leaves the rank out: at a given step every rank serves the same length
        # rank of its own block (its k-th shortest batch), so DDP ranks, which wait for the
        # slowest at each step, get batches of similar lengths.
        same_on_every_rank = np.random.default_rng([self.seed, epoch, block, _worker_id(), len(batches)])
        return [batches[i] for i in same_on_every_rank.permutation(len(batches))]

    def __iter__(self) -> Iterator[dict]:
        resume, self._resume = self._resume, None
        start = resume["epoch"] if resume else 0
        epochs = count(start) if self.passes is None else range(start, self.passes)
        for epoch in epochs:
            source = self.source(epoch)
            block, served = 0, 0
            if resume and resume["block_start"] is not None:
                source.load_state_dict(resume["block_start"])
            if resume:
                block, served = resume["block"], resume["served"]
            block_start = resume["block_start"] if resume else None
            resume = None
            rows = _rows(source) if source is not None else iter(())
            served_any = False
            while True:
                rows_of_block = self._next_block(rows)
                if not rows_of_block:
                    break
                for position, index in enumerate(self._block_order(epoch, block, rows_of_block)):
                    if position < served:
                        continue
                    self._state = {
                        "epoch": epoch,
                        "block": block,
                        "block_start": block_start,
                        "served": position + 1,
                    }
                    served_any = True
                    if self.length_of is None:
                        yield self._served(rows_of_block[index], epoch)
                    else:
                        yield [self._served(rows_of_block[i], epoch) for i in index]
                # The source now stands at the next block's first row: that is where it resumes.
                block, served, block_start = block + 1, 0, copy.deepcopy(source.state_dict())
            self._state = {"epoch": epoch + 1, "block": 0, "block_start": None, "served": 0}
            if not served_any and not (block or served):
                # Nothing to read (e.g. a DataLoader worker given no shard): repeating the epoch
                # forever would never yield, so this stream ends here.
                log.warning(
                    "Training stream (rank %d, worker %d) holds no rows; with more DataLoader workers "
                    "than shards, lower data.num_workers.",
                    self.rank,
                    _worker_id(),
                )
                return

    def _served(self, row: dict, epoch: int) -> dict:
        return row if self.transform is None else self.transform(row, epoch)

    def _next_block(self, rows: Iterator[dict]) -> list[dict]:
        try:
            return list(islice(rows, self.block_size))
        except Exception as error:
            described = self.read_error(error) if self.read_error is not None else None
            if described is None:
                raise
            raise described from error

    def state_dict(self) -> dict:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state_dict: dict) -> None:
        self._state = copy.deepcopy(state_dict)
        self._resume = copy.deepcopy(state_dict)
