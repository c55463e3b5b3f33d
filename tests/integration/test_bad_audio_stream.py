"""A training stream with 10 % bad rows trains to its end; the logged skip count is the bad rows.

The demo late-fusion recipe, through the CLI, on a parquet stream built here: demo clips plus one
bad row of every kind the audio loader refuses, and rows without a transcription (the recipe's
alignment term needs one), each under an id that names its kind.
"""

from __future__ import annotations

import io
import logging
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
from demo_recipes import ROOT
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cli import cli_main

GOOD_ROWS = 90
BATCH = 10


def _wav(samples: np.ndarray, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def _with_sample(value: float) -> np.ndarray:
    signal = np.full(16000, 0.1, np.float32)
    signal[100] = value
    return signal


# Every way a cell can be unusable (the audio column is {bytes, path}, as `datasets` stores it).
BAD_AUDIO = {
    "undecodable": {"bytes": b"junk" * 50, "path": None},
    "empty": {"bytes": _wav(np.zeros(0, np.float32)), "path": None},
    "all-zero": {"bytes": _wav(np.zeros(16000, np.float32)), "path": None},
    "nan": {"bytes": _wav(_with_sample(np.nan)), "path": None},
    "inf": {"bytes": _wav(_with_sample(np.inf)), "path": None},
    "missing": None,
    "no-bytes-no-path": {"bytes": None, "path": None},
    "too-short": {"bytes": _wav(np.full(1600, 0.1, np.float32)), "path": None},  # 0.1 s < demo's 0.5 s
}
# Good audio, but no transcription for the alignment term (the recipe's loss aligns to transcriptions).
NO_TRANSCRIPTION = {"no-transcription": None, "empty-transcription": " "}
BAD_ROWS = 10  # 10 % of the stream: every kind once


@pytest.fixture(scope="module")
def stream_with_bad_rows(speech_corpus_dir, tmp_path_factory):
    shard = sorted((speech_corpus_dir / "train").glob("*.parquet"))[0]
    rows = pq.read_table(shard).slice(0, GOOD_ROWS).to_pylist()
    bad = [
        {**rows[i], "id": f"bad-{kind}-{i}", "audio": cell}
        for i, (kind, cell) in enumerate(BAD_AUDIO.items())
    ]
    bad += [
        {**rows[i], "id": f"bad-{kind}-{i}", "query": text}
        for i, (kind, text) in enumerate(NO_TRANSCRIPTION.items(), start=len(bad))
    ]
    assert len(bad) == BAD_ROWS
    stream = rows + bad
    random.Random(0).shuffle(stream)
    audio = pa.array(
        [row["audio"] for row in stream], type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    )
    columns = {name: [row[name] for row in stream] for name in ("id", "task", "query", "document")}
    path = tmp_path_factory.mktemp("bad-stream") / "train.parquet"
    pq.write_table(pa.table({**columns, "audio": audio}), path)
    return path, [row["id"] for row in bad]


def test_a_stream_with_ten_percent_bad_audio_trains_to_the_end(
    stream_with_bad_rows, demo_dir, tmp_path, monkeypatch, caplog
):
    path, bad_ids = stream_with_bad_rows
    monkeypatch.chdir(ROOT)
    with caplog.at_level(logging.WARNING):
        cli = cli_main(
            [
                "fit",
                "--config=configs/demo/late_fusion.yaml",
                f"--trainer.default_root_dir={tmp_path}",
                f"--data.init_args.train_data={path}",
                "--data.init_args.passes=1",
                f"--data.init_args.batch_size={BATCH}",
                "--trainer.max_steps=-1",
                "--trainer.max_epochs=1",
                "--trainer.limit_val_batches=0",
                "--trainer.log_every_n_steps=1",
                "--trainer.enable_progress_bar=false",
                "--model.init_args.lr_scheduler.init_args.warmup_steps=1",
                "--model.init_args.lr_scheduler.init_args.total_steps=10",
            ]
        )
    trainer = cli.trainer
    assert trainer.state.finished and not trainer.interrupted
    # Every batch kept enough rows to train: one optimizer step per batch of the stream.
    assert trainer.global_step == (GOOD_ROWS + BAD_ROWS) // BATCH
    assert cli.model.guard.skipped_rows == BAD_ROWS
    (events_file,) = tmp_path.glob("tensorboard/version_*/events.out.tfevents.*")
    events = EventAccumulator(str(events_file), size_guidance={"scalars": 0}).Reload()
    assert events.Scalars("train/skipped_rows")[-1].value == BAD_ROWS
    warnings = "\n".join(record.getMessage() for record in caplog.records)
    for row_id in bad_ids:
        assert warnings.count(f"'{row_id} (") == 1, row_id  # named once, with its reason
