"""Checkpoint files: written whole or not at all under SIGKILL, and ``last`` resolving to one that loads."""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from trainers import quiet_cpu_trainer

from callbacks.checkpoint_files import AtomicCheckpointIO, checkpoint_problem, resolve_checkpoint
from callbacks.preemption import PreemptionCheckpoint
from errors import DataError


def _other_file_system_tmpdir(path: Path) -> Path:
    """A temporary folder on another file system than ``path`` (where the old move was a copy)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system than the test's folder")
    folder = shm / f"checkpoint-test-{os.getpid()}-{random.randrange(10**9)}"
    folder.mkdir()
    return folder


def _save(path: Path, step: int, size: int = 4_000_000) -> None:
    checkpoint = {"global_step": step, "weights": torch.full((size,), float(step))}
    AtomicCheckpointIO().save_checkpoint(checkpoint, path)


# ----- checkpoint_problem: agrees with torch.load --------------------------------------------


def test_a_whole_checkpoint_has_no_problem_and_every_cut_one_does(tmp_path):
    path = tmp_path / "whole.ckpt"
    _save(path, step=3, size=10_000)
    assert checkpoint_problem(path) is None
    assert torch.load(path, weights_only=True)["global_step"] == 3
    data = path.read_bytes()
    for cut in [0, 1, 100, len(data) // 2, len(data) - 22, len(data) - 1]:
        cut_path = tmp_path / f"cut-{cut}.ckpt"
        cut_path.write_bytes(data[:cut])
        problem = checkpoint_problem(cut_path)
        assert problem is not None, cut
        # The independent reference: torch cannot load it either.
        with pytest.raises((RuntimeError, EOFError, OSError, pickle.UnpicklingError)):
            torch.load(cut_path, weights_only=True)
    assert "empty" in checkpoint_problem(tmp_path / "cut-0.ckpt")


def test_a_flipped_byte_in_the_weights_fails_its_checksum(tmp_path):
    path = tmp_path / "damaged.ckpt"
    _save(path, step=1, size=10_000)
    data = bytearray(path.read_bytes())
    middle = data.index(b"\x00\x00\x80\x3f")  # the float 1.0 of the weights
    data[middle + 3] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "fails its checksum" in checkpoint_problem(path)


# ----- SIGKILL during writes, with $TMPDIR on another file system ---------------------------


def _write_forever(path: str, tmpdir: str, start: int) -> None:
    import tempfile

    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP thread pool
    tempfile.tempdir = tmpdir  # where a default fsspec/Lightning save would stage its copy
    step = start
    while True:
        step += 1
        _save(Path(path), step)


def test_sigkill_during_checkpoint_writes_never_leaves_a_broken_checkpoint(tmp_path):
    """Forty kills at random moments of a writer saving 16 MB checkpoints in a loop; about half
    are aimed at the moment a temporary file exists (inside a write; at least 8 must land there).
    After every kill the checkpoint is whole (checked and loaded) and no older than before it."""
    tmpdir = _other_file_system_tmpdir(tmp_path)
    path = tmp_path / "checkpoints" / "last.ckpt"
    context = multiprocessing.get_context("fork")
    rng = random.Random(0)
    kills = inside_a_write = 0
    last_step = 0
    for attempt in range(40):
        writer = context.Process(target=_write_forever, args=(str(path), str(tmpdir), last_step * 10))
        writer.start()
        deadline = time.monotonic() + 120
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        if attempt % 2:  # aimed: wait for a temporary file, then a random instant of the write
            while not list(path.parent.glob("*.partial")) and time.monotonic() < deadline:
                pass
            time.sleep(rng.uniform(0, 0.005))
        else:
            time.sleep(rng.uniform(0, 0.2))
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        kills += 1
        inside_a_write += bool(list(path.parent.glob("*.partial")))
        assert checkpoint_problem(path) is None, (attempt, checkpoint_problem(path))
        step = torch.load(path, weights_only=True)["global_step"]
        assert step >= last_step
        last_step = step
    assert not list(tmpdir.iterdir()), "nothing is staged in $TMPDIR"
    tmpdir.rmdir()
    logging.getLogger(__name__).info("%d kills, %d inside a write", kills, inside_a_write)
    assert inside_a_write >= 8, f"only {inside_a_write} of {kills} kills landed inside a write"


# ----- resolving --ckpt_path -----------------------------------------------------------------


def _trainer(folder: Path):
    return quiet_cpu_trainer(
        callbacks=[ModelCheckpoint(dirpath=folder, filename="last"), PreemptionCheckpoint()]
    )


def _age(path: Path, seconds_ago: float) -> None:
    moment = time.time() - seconds_ago
    os.utime(path, (moment, moment))


def test_last_is_the_newest_last_checkpoint_when_it_is_whole(tmp_path):
    _save(tmp_path / "last.ckpt", 20, size=10)
    _save(tmp_path / "last-preempted.ckpt", 12, size=10)
    _save(tmp_path / "best-step=20.ckpt", 20, size=10)
    _age(tmp_path / "last-preempted.ckpt", 60)
    assert resolve_checkpoint(_trainer(tmp_path), "last") == str(tmp_path / "last.ckpt")


def test_an_empty_last_falls_back_to_the_newest_whole_checkpoint_with_a_warning(tmp_path, caplog):
    """The kill the issue reports: last.ckpt at 0 bytes beside an intact best-step=20.ckpt."""
    _save(tmp_path / "best-step=20.ckpt", 20, size=10)
    _save(tmp_path / "last-preempted.ckpt", 12, size=10)
    _age(tmp_path / "last-preempted.ckpt", 60)
    (tmp_path / "last.ckpt").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        chosen = resolve_checkpoint(_trainer(tmp_path), "last")
    assert chosen == str(tmp_path / "best-step=20.ckpt")
    message = caplog.text
    assert f"{tmp_path / 'last.ckpt'}, cannot be loaded (empty (0 bytes" in message
    assert f"resuming from {tmp_path / 'best-step=20.ckpt'}" in message


def test_last_with_nothing_whole_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"PK\x03\x04 cut off")
    with pytest.raises(DataError, match=r"last.ckpt, cannot be loaded \(not a whole checkpoint"):
        resolve_checkpoint(_trainer(tmp_path), "last")


def test_last_with_no_checkpoint_is_left_to_lightning(tmp_path):
    assert resolve_checkpoint(_trainer(tmp_path / "none-yet"), "last") == "last"


def test_an_unreadable_checkpoint_path_is_refused_naming_the_whole_ones(tmp_path):
    _save(tmp_path / "best-step=20.ckpt", 20, size=10)
    (tmp_path / "last.ckpt").write_bytes(b"")
    with pytest.raises(DataError) as error:
        resolve_checkpoint(_trainer(tmp_path), str(tmp_path / "last.ckpt"))
    assert "empty (0 bytes" in str(error.value) and "best-step=20.ckpt" in str(error.value)
    assert resolve_checkpoint(_trainer(tmp_path), str(tmp_path / "best-step=20.ckpt")).endswith("20.ckpt")
    for passed_through in (None, "best", "s3://bucket/run/last.ckpt"):
        assert resolve_checkpoint(_trainer(tmp_path), passed_through) == passed_through
