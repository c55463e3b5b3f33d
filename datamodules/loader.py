"""A stateful training loader whose saved position is the last batch training took, not fetched."""

from __future__ import annotations

from collections.abc import Iterator

from torchdata.stateful_dataloader import StatefulDataLoader

STATE_KEY = "loader_state"


class ConsumedPositionLoader(StatefulDataLoader):
    """``StatefulDataLoader`` whose ``state_dict`` is the position after the last *consumed* batch.

    Lightning fetches one batch ahead of the step it runs (to know which batch is the last), so
    the plain loader's state at checkpoint time already counts a batch no step has seen, and a
    resumed run would skip it. Here every batch carries the loader state right after it
    (``batch["loader_state"]``); the datamodule hands it back with ``mark_consumed`` when the
    training loop takes the batch, and that is the state a checkpoint saves.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._consumed_state: dict | None = None

    def __iter__(self) -> Iterator[dict]:
        for batch in super().__iter__():
            batch[STATE_KEY] = super().state_dict()
            yield batch

    def mark_consumed(self, batch: dict) -> None:
        """Records ``batch`` as taken by training (and strips the state it carried)."""
        state = batch.pop(STATE_KEY, None)
        if state is not None:
            self._consumed_state = state

    def state_dict(self) -> dict:
        return self._consumed_state if self._consumed_state is not None else super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self._consumed_state = None
        super().load_state_dict(state_dict)
