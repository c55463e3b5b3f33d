"""BatchGuard's skipped-row reporting: each row named once, a summary by kind per pass and at the
end, counters that resume from a checkpoint."""

from __future__ import annotations

import io
import json
import logging

import torch

from callbacks.training_guards import BatchGuard
from datamodules.pairs import StreamingPairDataModule

SILENT = "silent: peak -90.5 dBFS below data.audio.silence_threshold_dbfs=-60"
UNDECODABLE = "undecodable audio (LibsndfileError: Format not recognised.)"


def _batch(data_pass: int, *skips: tuple[str, str, str]) -> dict:
    """A training batch of pass ``data_pass`` whose skipped rows are ``(id, reason, kind)``."""
    return {
        "ids": ["good"],
        "data_pass": data_pass,
        "skipped_ids": [row for row, _, _ in skips],
        "skip_reasons": [reason for _, reason, _ in skips],
        "skip_kinds": [kind for _, _, kind in skips],
    }


# The same three bad rows in each of two passes over the data.
FIRST_PASS = [
    _batch(0, ("r1", SILENT, "silent"), ("r2", UNDECODABLE, "undecodable audio")),
    _batch(0),
    _batch(0, ("r3", "missing or empty document", "missing or empty document")),
]
SECOND_PASS = [
    _batch(1, ("r3", "missing or empty document", "missing or empty document")),
    _batch(1, ("r2", UNDECODABLE, "undecodable audio"), ("r1", SILENT, "silent")),
    _batch(1),
]


def _feed(guard: BatchGuard, batches: list[dict]) -> None:
    for index, batch in enumerate(batches):
        guard.on_train_batch_start(None, None, batch, index)


def _lines(caplog) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "callbacks.training_guards"]


FIRST_SKIPS = [
    ("WARNING", f"Skipped 2 bad training rows (total 2): ['r1 ({SILENT})', 'r2 ({UNDECODABLE})']"),
    ("WARNING", "Skipped 1 bad training rows (total 3): ['r3 (missing or empty document)']"),
]
AFTER_PASS_1 = (
    "INFO",
    "Skipped training rows after pass 1 over the training data: 3 in all (silent: 1; undecodable "
    "audio: 1; missing or empty document: 1), 3 distinct rows, each named in a warning at its first "
    "skip only.",
)
AT_THE_END = (
    "WARNING",
    "Skipped training rows in this fit: 6 in all (silent: 2; undecodable audio: 2; missing or empty "
    "document: 2), 3 distinct rows, each named in a warning at its first skip only.",
)


def test_rows_skipped_again_in_a_later_pass_are_counted_not_named_again(caplog):
    guard = BatchGuard()
    with caplog.at_level(logging.INFO, logger="callbacks"):
        _feed(guard, FIRST_PASS + SECOND_PASS)
        guard.on_train_end(None, None)
    assert _lines(caplog) == [*FIRST_SKIPS, AFTER_PASS_1, AT_THE_END]
    assert guard.skipped_rows == 6


def test_a_batch_mixing_new_and_named_rows_names_only_the_new_ones(caplog):
    guard = BatchGuard()
    with caplog.at_level(logging.INFO, logger="callbacks"):
        _feed(guard, [_batch(0, ("a", "x", "x")), _batch(0, ("a", "x", "x"), ("b", "y", "y"))])
    assert _lines(caplog)[-1] == (
        "WARNING",
        "Skipped 2 bad training rows (total 3): ['b (y)'] and 1 named before",
    )


def test_the_counters_resume_from_a_checkpoint_as_if_never_interrupted(caplog):
    before = BatchGuard()
    _feed(before, FIRST_PASS)
    checkpoint = {}
    before.on_save_checkpoint(None, None, checkpoint)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    resumed = BatchGuard()
    resumed.on_load_checkpoint(None, None, torch.load(buffer, weights_only=True))  # plain types only
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="callbacks"):
        _feed(resumed, SECOND_PASS)
        resumed.on_train_end(None, None)
    assert _lines(caplog) == [AT_THE_END]  # nothing named again
    assert checkpoint["embedder_counters"] == {
        "skipped_rows_per_rank": [3],
        "skips_by_kind_per_rank": [{"silent": 1, "undecodable audio": 1, "missing or empty document": 1}],
        "named_rows_per_rank": [["r1", "r2", "r3"]],
        "nonfinite_losses": 0,
    }


def test_counters_of_more_ranks_or_an_older_checkpoint_load():
    two_ranks = {
        "skipped_rows_per_rank": [3, 2],
        "skips_by_kind_per_rank": [{"silent": 3}, {"silent": 1, "unknown task": 1}],
        "named_rows_per_rank": [["a"], ["b", "c"]],
        "nonfinite_losses": 1,
    }
    guard = BatchGuard()
    guard.on_load_checkpoint(None, None, {"embedder_counters": two_ranks})  # now one process
    assert guard.skipped_rows == 5 and guard.skips_by_kind == {"silent": 4, "unknown task": 1}
    assert guard.named_rows == {"a", "b", "c"}
    older = BatchGuard()
    older.on_load_checkpoint(None, None, {"embedder_counters": {"skipped_rows_per_rank": [4]}})
    assert older.skipped_rows == 4 and not older.skips_by_kind and not older.named_rows


def test_the_training_loader_tells_the_pass_and_a_bad_row_is_named_once_over_two_passes(
    tiny_text_model, tmp_path, caplog
):
    rows = [{"id": f"r{i}", "query": "bita", "document": "fèfé"} for i in range(6)]
    rows[4]["document"] = ""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    data = StreamingPairDataModule(
        str(tiny_text_model), train_data=str(train), batch_size=3, shuffle_block_size=6, passes=2
    )
    data.setup("fit")
    guard = BatchGuard()
    with caplog.at_level(logging.INFO, logger="callbacks"):
        batches = [data.on_before_batch_transfer(batch, 0) for batch in data.train_dataloader()]
        _feed(guard, batches)
        guard.on_train_end(None, None)
    assert [batch["data_pass"] for batch in batches] == [0, 0, 1, 1]
    assert _lines(caplog) == [
        ("WARNING", "Skipped 1 bad training rows (total 1): ['r4 (missing or empty document)']"),
        (
            "INFO",
            "Skipped training rows after pass 1 over the training data: 1 in all (missing or empty "
            "document: 1), 1 distinct row, each named in a warning at its first skip only.",
        ),
        (
            "WARNING",
            "Skipped training rows in this fit: 2 in all (missing or empty document: 2), 1 distinct "
            "row, each named in a warning at its first skip only.",
        ),
    ]
