"""A stateful training loader whose saved position is the last batch training took, not fetched;
it also stops, naming the data, on a stream with no rows or no usable row."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping

from torchdata.stateful_dataloader import StatefulDataLoader

from errors import DataError, InputError

STATE_KEY = "loader_state"
PASS_KEY = "data_pass"
"""Batch key: the pass over the training data (0, 1, ...) its rows come from, for the skip summary."""


def _unwrapped(error: InputError) -> InputError:
    """The error a DataLoader worker raised, with its own message.

    A worker's exception reaches the main process re-raised with the worker's whole traceback as
    its message ("Caught DataError in DataLoader worker process 0. Original Traceback ..."), which
    the CLI would print in full instead of the one line the error was written as.
    """
    text, kind = str(error), type(error)
    marker = f"{kind.__module__}.{kind.__qualname__}: "
    if not text.startswith("Caught ") or marker not in text:
        return error
    return kind(text.rsplit(marker, 1)[1].rstrip("\n"))


def _stream_positions(state: Mapping) -> tuple[dict[int, Mapping], int]:
    """Each worker's ``ShuffledEpochStream`` state in a loader state, and the worker of the last batch."""
    if "dataset_state" in state:  # no worker processes
        return ({0: state["dataset_state"]} if state["dataset_state"] else {}), 0
    snapshot = state.get("_snapshot") or {}
    workers = snapshot.get("_worker_snapshots") or {}
    positions = {
        int(worker["worker_id"]): worker["dataset_state"]
        for worker in workers.values()
        if worker.get("dataset_state")
    }
    return positions, int(snapshot.get("_last_yielded_worker_id") or 0)


class _UsableRowsCheck:
    """Fails once every worker served a whole pass over its share with no usable row.

    A source whose every row is skipped (a wrong column name, every audio path missing) would
    otherwise be read again and again, each step skipped, for as long as training runs. A pass is
    one ``ShuffledEpochStream`` epoch, read from the loader state after each batch.
    """

    def __init__(self, source: str, resumed: bool):
        self.source = source
        self.resumed = resumed
        self.first_pass_to_check: dict[int, int] = {}  # worker -> the epoch that must hold a usable row
        self.rows_skipped = 0
        self.reasons: Counter[str] = Counter()

    def after(self, batch: Mapping, state: Mapping) -> None:
        positions, worker = _stream_positions(state)
        if not positions or not all("epoch" in position for position in positions.values()):
            return
        for other, position in positions.items():
            # A fresh run checks from the first pass; a resumed one from the first pass it starts.
            self.first_pass_to_check.setdefault(other, position["epoch"] + 1 if self.resumed else 0)
        if batch.get("ids"):
            # A usable row: the pass that must hold one next is the one after the current pass.
            self.first_pass_to_check[worker] = positions[worker]["epoch"] + 1
            self.rows_skipped, self.reasons = 0, Counter()
            return
        skipped = batch.get("skipped_ids") or []
        self.rows_skipped += len(skipped)
        self.reasons.update(batch.get("skip_reasons") or [])
        if all(position["epoch"] > self.first_pass_to_check[w] for w, position in positions.items()):
            reasons = "; ".join(f"{reason} ({count})" for reason, count in self.reasons.most_common(3))
            raise DataError(
                f"{self.source}: a whole pass over the training data gave no usable row "
                f"({self.rows_skipped} rows read, every one skipped: {reasons or 'no reason given'}). "
                "Check that data.query_column, data.document_column and data.audio.column name the "
                "file's columns, that its audio is there and decodes, and the data.audio duration limits."
            )


class ConsumedPositionLoader(StatefulDataLoader):
    """``StatefulDataLoader`` whose ``state_dict`` is the position after the last *consumed* batch.

    Lightning fetches one batch ahead of the step it runs (to know which batch is the last), so
    the plain loader's state at checkpoint time already counts a batch no step has seen, and a
    resumed run would skip it. Here every batch carries the loader state right after it
    (``batch["loader_state"]``); the datamodule hands it back with ``mark_consumed`` when the
    training loop takes the batch, and that is the state a checkpoint saves. Every batch also
    carries the pass over the data it comes from (``batch["data_pass"]``, that of the worker that
    made it), by which ``BatchGuard`` sums up the skipped rows after each pass.

    With ``source`` (how to name the data in an error, e.g. ``data.train_data='train.jsonl'``),
    an iteration that yields no batch at all (unless resumed past the end of a finite stream), or
    a whole pass whose every row the collate function skipped, raises a ``DataError`` naming it.
    """

    def __init__(self, *args, source: str | None = None, endless: bool = False, **kwargs):
        """``endless``: the dataset repeats forever, so an iteration that ends had no rows at all."""
        super().__init__(*args, **kwargs)
        self.source = source
        self.endless = endless
        self._consumed_state: dict | None = None
        self._resumed = False

    def __iter__(self) -> Iterator[dict]:
        resumed, self._resumed = self._resumed, False
        check = _UsableRowsCheck(self.source, resumed) if self.source else None
        served = 0
        try:
            for batch in super().__iter__():
                state = super().state_dict()
                if check is not None:
                    check.after(batch, state)
                positions, worker = _stream_positions(state)
                if "epoch" in positions.get(worker, {}):
                    batch[PASS_KEY] = positions[worker]["epoch"]
                batch[STATE_KEY] = state
                served += 1
                yield batch
        except InputError as error:
            raise _unwrapped(error) from None
        if served == 0 and self.source and (self.endless or not resumed):
            raise DataError(
                f"{self.source} holds no rows to train on (a CSV file with only its header, a JSON "
                "Lines file with only blank lines, an empty split): put query/document pairs in it, "
                "or point data.train_data at the file that has them."
            )

    def mark_consumed(self, batch: dict) -> None:
        """Records ``batch`` as taken by training (and strips the state it carried)."""
        state = batch.pop(STATE_KEY, None)
        if state is not None:
            self._consumed_state = state

    def state_dict(self) -> dict:
        return self._consumed_state if self._consumed_state is not None else super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self._consumed_state = None
        self._resumed = True
        super().load_state_dict(state_dict)
