"""One TensorBoard run per training run, drawn at the optimizer step the terminal prints.

Left to Lightning's defaults, a run's curves are split and skewed:
- a resumed fit (``fit --ckpt_path last`` after a preemption or a crash) opens a new
  ``version_N`` folder, so one training run's curves lie in two TensorBoard runs;
- scalars are drawn at the number of batches stepped *before* the current one, so the validation
  the terminal announces as "val at step 300" sits at 299, beside its own figures at 300;
- the points a killed run wrote after its last checkpoint stay: the resumed run draws those
  steps a second time, and TensorBoard joins old and new points into a zig-zag.

``TensorBoardRun`` (every ``MatryoshkaEmbedder`` adds it) logs ``step``, the optimizer steps taken,
with the scalars of each training step and each validation; Lightning's logger connector takes a
logged ``step`` as their x-axis. A training step's loss is then at that step's number, and a
validation at the step it validated. It also records each TensorBoard logger's version in every
checkpoint. ``continue_tensorboard_run`` (``cli.py fit --ckpt_path ...``) points the loggers back
at that version before they open their folder, with TensorBoard's ``purge_step`` at the step after
the checkpoint's: readers drop what earlier writers of the folder wrote from that step on, and the
resumed run writes those steps again, once. ``discard_refused_run`` (around every ``cli.py``
command) removes the folder a refused run opened: Lightning opens it at setup, before the checks
that refuse a run (a monitor no validation logs, missing data), which left empty ``version_N``
folders beside the real runs.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from callbacks.lightning_internals import continue_tensorboard_version, tensorboard_started

log = logging.getLogger(__name__)

# The checkpoint's record of its run's TensorBoard folders: {logger name: version}.
CHECKPOINT_KEY = "tensorboard_versions"


def tensorboard_loggers(trainer: Trainer) -> list[TensorBoardLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


class TensorBoardRun(Callback):
    """Scalars at the optimizer step (``step``) and the run's TensorBoard versions in checkpoints."""

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        # After the optimizer step, so ``global_step`` counts it. ModelCheckpoint names its files
        # by a logged ``step``; Lightning runs checkpoint callbacks after the others, so it reads
        # this one, the number it would read otherwise. A logged ``step`` also replaces
        # Lightning's ``epoch`` scalar, kept here beside the training scalars.
        pl_module.log("step", float(trainer.global_step), batch_size=1)
        pl_module.log("epoch", float(trainer.current_epoch), batch_size=1)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            # Identical on every rank; sync_dist keeps Lightning's check on epoch-level values quiet.
            pl_module.log("step", float(trainer.global_step), batch_size=1, sync_dist=True, reduce_fx="max")

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        # Rank 0 writes the file and its loggers hold the folder; other ranks never opened one.
        if trainer.is_global_zero:
            checkpoint[CHECKPOINT_KEY] = {
                logger.name: logger.version for logger in tensorboard_loggers(trainer)
            }


def continue_tensorboard_run(trainer: Trainer, checkpoint_path: str | Path | None) -> None:
    """Before ``trainer.fit(ckpt_path=checkpoint_path)``: each TensorBoard logger writes on in the
    version folder that the checkpoint's run wrote, and TensorBoard drops what that folder holds
    after the checkpoint's step (the resumed run writes those steps again).

    Every rank reads the same file, so every rank takes the same version. A logger given a
    version explicitly keeps it (its folder is the same on every resume anyway).
    """
    # A logger already writing (a second fit in one process) stays in its folder.
    loggers = [logger for logger in tensorboard_loggers(trainer) if not tensorboard_started(logger)]
    if not loggers or checkpoint_path is None or not get_filesystem(checkpoint_path).isfile(checkpoint_path):
        return  # a fresh run, or a value Lightning resolves itself ("last" with no checkpoint yet)
    # cli.py resolved the path to a whole checkpoint (callbacks/checkpoint_files.py), which holds
    # plain data only: this load fails only where Lightning's own would.
    checkpoint = _read_checkpoint(checkpoint_path)
    versions = checkpoint.get(CHECKPOINT_KEY, {})
    if not versions:
        log.info("TensorBoard: %s records no version; the run logs to a new folder.", checkpoint_path)
    for logger in loggers:
        # The checkpoint holds step S and every point of steps <= S was written before it was
        # saved; points from S + 1 on are the resumed run's to write.
        continue_tensorboard_version(logger, versions.get(logger.name), checkpoint["global_step"] + 1)


def _read_checkpoint(path: str | Path) -> dict:
    """The checkpoint's plain data; memory-mapped when local, so its weights are not read."""
    filesystem = get_filesystem(path)
    if isinstance(filesystem, LocalFileSystem):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    with filesystem.open(path, "rb") as file:
        return torch.load(file, map_location="cpu", weights_only=True)


@contextmanager
def discard_refused_run(trainer: Trainer, trains: bool) -> Iterator[None]:
    """Around a command: if it fails before it trains (any failure of a command that does not train,
    ``trains=False``; a ``fit`` before its first optimizer step), the TensorBoard version folder it
    opened is removed, with the folders above it that the run created and left empty. A folder
    that existed before the command (a resumed run's) is kept. Local folders, rank 0 only.
    """
    loggers = [
        logger
        for logger in tensorboard_loggers(trainer)
        if rank_zero_only.rank == 0 and isinstance(get_filesystem(logger.root_dir), LocalFileSystem)
    ]
    before = {logger: _existing_folders(Path(logger.root_dir)) for logger in loggers}
    step = trainer.global_step
    try:
        yield
    except BaseException:
        if not trains or trainer.global_step == step:
            for logger, existed in before.items():
                if tensorboard_started(logger):
                    _remove_new_folders(Path(logger.log_dir), existed)
        raise


def _existing_folders(root: Path) -> set[Path]:
    """The folders that exist among ``root``, its version folders and its ancestors."""
    versions = {path for path in root.iterdir() if path.is_dir()} if root.is_dir() else set()
    return versions | {path for path in (root, *root.parents) if path.is_dir()}


def _remove_new_folders(folder: Path, existed: set[Path]) -> None:
    if folder in existed or not folder.is_dir():
        return
    shutil.rmtree(folder, ignore_errors=True)
    log.info("Removed %s: the run stopped before it trained.", folder)
    for parent in folder.parents:
        if parent in existed or any(parent.iterdir()):
            break
        parent.rmdir()
