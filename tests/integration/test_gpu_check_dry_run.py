"""The device script's plumbing on this CPU: ``benchmarks/gpu_check.sh --dry-run`` runs every step
at tiny shapes (the gpu tests on the CPU too) and writes one report with every section passed."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from demo_recipes import ROOT

SECTIONS = [
    "gpu tests",
    "real-size late fusion",
    "text-only vs sentence-transformers",
    "evaluation of 4 dims vs sentence-transformers",
    "speech tower batching",
]


@pytest.mark.slow  # 94 s on 2 idle CPU cores, about 5 minutes on a loaded machine
def test_dry_run_writes_every_section(tmp_path):
    pytest.importorskip("sentence_transformers", reason="the `bench` extra: pip install -e '.[dev,bench]'")
    report = tmp_path / "gpu_check.md"
    environment = os.environ | {"PYTHON": sys.executable, "DEMO_DATA_DIR": str(tmp_path / "demo")}
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(report)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
    )
    text = report.read_text()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "failed: none" in text and "DRY RUN" in text
    for section in SECTIONS:
        assert re.search(rf"## {re.escape(section)}\n.*?exit status 0,", text, re.S), section
    # The gpu tests ran (on the CPU), none skipped, and their measured errors are in the table.
    assert re.search(r"\d+ passed, \d+ deselected", text) and "skipped" not in text.split("## real-size")[0]
    assert "| test_bf16_mixed_step_matches_float32[late_fusion] | loss difference |" in text
    assert "| 3 s |" not in text and "| 1 s | document cache |" in text  # the dry run's shapes
