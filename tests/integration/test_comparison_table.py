"""benchmarks/comparison_table.py: runs recipes, and its table is what each run logged."""

from __future__ import annotations

import csv
import sys

import pytest
from demo_recipes import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import comparison_table  # noqa: E402


def _last_scalars(run_dir):
    """Read independently of the script: raw event records, the last value of each tag."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    last = {}
    for path in sorted((run_dir / "tensorboard").glob("version_*/events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.HasField("tensor") and value.metadata.plugin_data.plugin_name == "scalars":
                    last[value.tag] = (event.step, float(tensor_util.make_ndarray(value.tensor)))
                elif value.HasField("simple_value"):
                    last[value.tag] = (event.step, value.simple_value)
    return last


def test_the_table_holds_what_each_run_logged(demo_dir, tmp_path):
    quick = [
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=2",
        "--trainer.log_every_n_steps=1",
        "--data.init_args.batch_size=8",
        "--model.init_args.lr_scheduler.init_args.warmup_steps=1",
    ]
    rows = comparison_table.main(["--out", str(tmp_path), "--recipes", "text_only", "--", *quick])
    (row,) = rows
    logged = _last_scalars(tmp_path / "text_only")
    for dim in (32, 64, 128, 256):
        assert row[f"ndcg@10/d{dim}"] == pytest.approx(logged[f"val/demo/ndcg@10/d{dim}"][1])
    assert row["steps"] == logged["val/demo/ndcg@10/d256"][0] == 4
    assert row["keywords accuracy/d256"] is None  # the text-only recipe has no classification sets
    assert row["ASR CER"] is None  # nor a recognizer
    assert row["s/step"] > 0 and row["trainable parameters"] > 0

    with open(tmp_path / "comparison.csv") as handle:
        (written,) = list(csv.DictReader(handle))
    assert float(written["ndcg@10/d256"]) == pytest.approx(row["ndcg@10/d256"])
    assert "| text-only (oracle transcripts) | 4 |" in (tmp_path / "comparison.md").read_text()

    # --reuse reads the finished run again instead of training it a second time.
    again = comparison_table.main(["--out", str(tmp_path), "--recipes", "text_only", "--reuse"])
    assert again == rows


def test_the_cascade_row_holds_its_recognizers_error_rates(demo_dir, tmp_path):
    """An evaluation-only recipe: no training steps, and the CER / WER its validation logged."""
    (row,) = comparison_table.main(["--out", str(tmp_path), "--recipes", "pipelined"])
    logged = _last_scalars(tmp_path / "pipelined")
    assert row["steps"] is None and row["trainable parameters"] is None and row["s/step"] is None
    assert row["ASR CER"] == pytest.approx(logged["val/demo/cer"][1])
    assert row["ASR WER"] == pytest.approx(logged["val/demo/wer"][1])
    assert row["ndcg@10/d256"] == pytest.approx(logged["val/demo/ndcg@10/d256"][1])
