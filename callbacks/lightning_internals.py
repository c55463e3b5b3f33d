"""Every place this project reaches into Lightning's private or undocumented state, with the reason.

Lightning offers no public way to do these things; keeping them here makes a Lightning upgrade one
file to check, and ``tests/.../test_lightning_internals.py`` fails when one of them moves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the TensorBoard helpers below are used by Lightning-free code too
    from lightning.pytorch import Trainer


def fit_loop_state(checkpoint: dict) -> dict:
    """The fit loop's own state in a checkpoint, where Lightning keeps the dataloader position.

    Lightning saves rank 0's position only; exact resume replaces it with each rank's own before
    Lightning restores the loops (which happens after the callbacks' ``on_load_checkpoint``).
    """
    return checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})


def is_last_batch(trainer: Trainer) -> bool:
    """Whether the batch being trained on is the training stream's last (its passes are done)."""
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


def accumulating(trainer: Trainer) -> bool:
    """Mid-way through ``accumulate_grad_batches`` (the optimizer has not stepped on this batch)."""
    return trainer.fit_loop.epoch_loop._should_accumulate()


def validates_after_this_step(trainer: Trainer) -> bool:
    """Whether Lightning will run validation after the current step (``val_check_interval``)."""
    fit_loop = trainer.fit_loop
    return fit_loop.epoch_loop._should_check_val_fx(fit_loop._data_fetcher)


def skip_next_validation(trainer: Trainer) -> None:
    """Lightning validates before a requested stop (meant for early stopping); a preempted run
    must not spend its grace period on a full evaluation."""
    trainer.fit_loop.epoch_loop._skip_next_val = True


def run_validation_now(trainer: Trainer) -> None:
    """Runs the fit's validation loop now, as Lightning's training loop runs it after a step."""
    epoch_loop = trainer.fit_loop.epoch_loop
    trainer.validating = True
    first_loop_iter = trainer._logger_connector._first_loop_iter
    # A fresh validation, as Lightning's first resumed step makes it: restarting, the loop would
    # keep the batch counts of the last validation the checkpoint saw and stop that much early.
    epoch_loop.val_loop.restarting = False
    epoch_loop.val_loop.run()
    trainer.training = True
    trainer._logger_connector._first_loop_iter = first_loop_iter


def cluster_environment(trainer: Trainer):
    """The cluster environment Lightning detected (SLURM, torchelastic, ...), where its own signal
    set-up reads it: single-device strategies do not expose it."""
    return trainer._accelerator_connector.cluster_environment


def tensorboard_started(logger) -> bool:
    """Whether a ``TensorBoardLogger`` has opened its version folder (its writer exists)."""
    return logger._experiment is not None


def continue_tensorboard_version(logger, version: int | None, purge_step: int) -> None:
    """Points a ``TensorBoardLogger`` that has not opened its folder yet at a resumed run's version,
    and has TensorBoard drop that folder's points from ``purge_step`` on. Lightning takes neither
    once the logger exists, and the CLI builds the logger before the checkpoint is read. A version
    or purge_step the user set is kept (LightningCLI passes an unset purge_step as None)."""
    if logger._version is None and version is not None:
        logger._version = version
    if logger._kwargs.get("purge_step") is None:
        logger._kwargs["purge_step"] = purge_step


def tensorboard_hparams(logger, hparams) -> dict:
    """The module's hyperparameters flattened and sanitized as ``TensorBoardLogger.log_hyperparams``
    does, for writing the HParams summary without the metric values it would log again."""
    from lightning.fabric.utilities.logger import _convert_params, _flatten_dict

    return logger._sanitize_params(_flatten_dict(_convert_params(hparams)))


def summary_file_writer(writer):
    """torch's ``SummaryWriter`` file writer, which takes raw summaries (the HParams plugin's)."""
    return writer._get_file_writer()


def last_checkpoints_of(callback, trainer: Trainer) -> set[str]:
    """The ``last*.ckpt`` files a ``ModelCheckpoint`` without a dirpath would resume from: its folder
    is resolved from the logger, which Lightning alone knows how to do."""
    return callback._find_last_checkpoints(trainer)


# cli.py also overrides ``LightningCLI._parse_ckpt_path`` (to check a named checkpoint whole before
# LightningCLI unpickles its hyperparameters); the test checks that the method still exists.
