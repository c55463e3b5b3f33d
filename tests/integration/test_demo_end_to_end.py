"""The README's demo commands, end to end (slow: run with `pytest -m slow`).

Trains the demo recipes exactly as the README runs them and checks the acceptance figures:
the untrained model is near chance, the trained one retrieves (nDCG@10 >= 0.5 at the largest dim).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cli import cli_main

DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "demo" / "text_only.yaml")
LATE_FUSION_DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "demo" / "late_fusion.yaml")


@pytest.mark.slow
def test_demo_recipe_learns_the_vocabulary_mapping(demo_dir, tmp_path):
    args = ["--config", DEMO, f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
    untrained = cli_main(["validate", *args])
    before = float(untrained.trainer.callback_metrics["val/demo/ndcg@10/d256"])
    trained = cli_main(["fit", *args])
    after = {d: float(trained.trainer.callback_metrics[f"val/demo/ndcg@10/d{d}"]) for d in (32, 64, 128, 256)}
    print(f"untrained nDCG@10 d256 = {before:.4f}; trained = {after}")
    assert before < 0.1
    assert after[256] >= 0.5


@pytest.mark.slow
def test_main_command_late_fusion_demo_retrieves_with_spoken_queries(tmp_path, monkeypatch):
    """The README's main command from nothing, as on a fresh clone: its own demo folder, so the
    speech corpus is full size and the text stage is trained first (about 11 minutes on 2 cores)."""
    monkeypatch.setenv("DEMO_DATA_DIR", str(tmp_path / "demo"))
    args = ["--config", LATE_FUSION_DEMO, "--trainer.enable_progress_bar=false"]
    trained = cli_main(["fit", *args, f"--trainer.default_root_dir={tmp_path / 'trained'}"])
    after = {d: float(trained.trainer.callback_metrics[f"val/demo/ndcg@10/d{d}"]) for d in (32, 64, 128, 256)}
    untrained = cli_main(["validate", *args, f"--trainer.default_root_dir={tmp_path / 'untrained'}"])
    before = float(untrained.trainer.callback_metrics["val/demo/ndcg@10/d256"])
    print(f"untrained nDCG@10 d256 = {before:.4f}; trained = {after}")
    assert before < 0.1
    assert after[256] >= 0.5
