"""SIGKILL of the real `cli.py fit` at random moments around its checkpoint writes, with $TMPDIR on
another file system, then `fit --ckpt_path last` again: every resume starts from a whole checkpoint.

Slow (each round starts a Python process that imports the stack): `pytest -m slow -k kill`;
KILL_ROUNDS sets the number of kills (8 by default).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from demo_recipes import ROOT, quick_text_only

from callbacks.checkpoint_files import checkpoint_problem

pytestmark = pytest.mark.slow


def _newest_last(folder: Path) -> Path | None:
    """What `--ckpt_path last` resumes from when every file is whole: the newest last*.ckpt."""
    lasts = list(folder.glob("last*.ckpt")) if folder.exists() else []
    return max(lasts, key=lambda path: path.stat().st_mtime) if lasts else None


def _saved_since(folder: Path, moment: float) -> bool:
    path = folder / "last.ckpt"
    return path.exists() and path.stat().st_mtime > moment


def test_sigkill_around_checkpoint_writes_then_resume_from_last(demo_dir, tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system than the run folder")
    tmpdir = Path(shm / f"kill-test-{os.getpid()}")
    tmpdir.mkdir(exist_ok=True)
    rounds = int(os.environ.get("KILL_ROUNDS", "8"))
    folder = tmp_path / "checkpoints"
    command = [
        sys.executable,
        "cli.py",
        "fit",
        *quick_text_only(tmp_path, "--trainer.max_steps=100000", "--trainer.val_check_interval=1"),
        "--ckpt_path=last",
    ]
    environment = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONUNBUFFERED": "1"}
    rng = random.Random(0)
    inside_a_write, resumed_from = 0, []
    try:
        for round_number in range(rounds):
            expected = _newest_last(folder)
            step_before = torch.load(expected, weights_only=True)["global_step"] if expected else 0
            log_path = tmp_path / f"round-{round_number}.log"
            with open(log_path, "w") as log:
                child = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=log, stderr=log)
                # Armed once the resumed run has saved a checkpoint of its own.
                started, deadline = time.time(), time.monotonic() + 600
                while not _saved_since(folder, started):
                    assert child.poll() is None, log_path.read_text()[-3000:]
                    assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
                    time.sleep(0.01)
                if round_number % 2:  # aimed: the instant a temporary checkpoint file appears
                    while not list(folder.glob("*.partial")) and child.poll() is None:
                        pass
                    time.sleep(rng.uniform(0, 0.003))
                else:
                    time.sleep(rng.uniform(0, 1.0))
                child.send_signal(signal.SIGKILL)
                child.wait()
            inside_a_write += bool(list(folder.glob("*.partial")))
            for path in folder.glob("*.ckpt"):
                assert checkpoint_problem(path) is None, (path, checkpoint_problem(path))
            if expected is not None:
                # The run resumed from the checkpoint `last` stands for, and trained on from its step.
                restored = re.search(
                    r"Restored all states from the checkpoint at (\S+)", log_path.read_text()
                )
                assert restored and Path(restored[1]) == expected, log_path.read_text()[-3000:]
                resumed_from.append(step_before)
        print(f"{rounds} kills, {inside_a_write} inside a checkpoint write; resumed at steps {resumed_from}")
        assert resumed_from == sorted(resumed_from) and len(resumed_from) == rounds - 1
        assert not list(tmpdir.iterdir()), "nothing was staged in $TMPDIR"
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
