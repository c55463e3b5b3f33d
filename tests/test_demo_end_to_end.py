"""The README's main command, end to end (slow: run with `pytest -m slow`).

Trains the demo recipe exactly as the README runs it and checks the acceptance figures:
the untrained model is near chance, the trained one retrieves (nDCG@10 >= 0.5 at the largest dim).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cli import cli_main

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo" / "text_only.yaml")


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
