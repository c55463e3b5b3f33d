"""A resumable, epoch-reshuffling view of a streaming ``datasets.IterableDataset``."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import count

from torch.utils.data import IterableDataset


class EpochStream(IterableDataset):
    """Iterates ``passes`` epochs of a streaming dataset (``None``: forever), reshuffling each epoch.

    Lightning calls ``set_epoch`` only on samplers, which an iterable dataset has none of, so the
    epoch is advanced here. ``state_dict`` is the dataset's own (it records the epoch), which
    torchdata's ``StatefulDataLoader`` saves and restores: a resumed run continues mid-epoch.
    """

    def __init__(self, dataset, passes: int | None = None):
        self.dataset = dataset
        self.passes = passes
        self._start_epoch = 0

    def __iter__(self) -> Iterator[dict]:
        epochs = count(self._start_epoch) if self.passes is None else range(self._start_epoch, self.passes)
        for epoch in epochs:
            self.dataset.set_epoch(epoch)
            yield from self.dataset

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.dataset.load_state_dict(state_dict)
        self._start_epoch = state_dict["epoch"]
