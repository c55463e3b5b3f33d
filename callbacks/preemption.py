"""Preemption: on SIGTERM / SIGUSR1, finish the current step, save a resumable checkpoint, stop.

Clusters announce preemption with a signal and a grace period (SLURM: ``#SBATCH
--signal=SIGUSR1@120``, SIGTERM before a kill). Lightning's own SIGTERM handler stops without a
checkpoint (and, with its DDP launcher, kills the other ranks at once), and its SLURM handler
saves from inside the signal handler, i.e. possibly halfway through an optimizer step. This
callback only raises a flag in the handler; at the end of the current optimizer step (the last
micro-batch of ``accumulate_grad_batches``), where weights, optimizer, loop counters and
dataloader position agree, all ranks learn of the flag
(one rank receiving the signal is enough), the checkpoint is written, and training stops.

The file is named ``last-preempted.ckpt`` in the checkpoint folder, so ``fit --ckpt_path last``
(the newest ``last*.ckpt``) resumes from it. Like every checkpoint of a run, it is written whole
or not at all (``callbacks/checkpoint_files.py``), so a kill during the write never replaces a
good checkpoint with half a file. The run stops without
the validation Lightning would run before a requested stop (it could outlast the grace period).

Under SLURM with Lightning's auto-requeue (the default there), the requeue signal (SIGUSR1, from
``--signal=SIGUSR1@120`` before the time limit) also requeues the job once the checkpoint is
written, as Lightning's own handler, which this callback replaces, would have: the next run of
the same ``fit --ckpt_path last`` command continues. SIGTERM (``scancel``, or a preemption the
scheduler requeues itself) only saves and stops.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer

from callbacks.lightning_internals import (
    accumulating,
    cluster_environment,
    run_validation_now,
    skip_next_validation,
    validates_after_this_step,
)

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last-preempted.ckpt"


class PreemptionCheckpoint(Callback):
    """Saves ``<dirpath>/last-preempted.ckpt`` and stops when one of ``signals`` arrives."""

    def __init__(self, dirpath: str | None = None, signals: Sequence[str] = ("SIGTERM", "SIGUSR1")):
        """
        Args:
            dirpath: Checkpoint folder (default: the first ModelCheckpoint's, else
                ``<default_root_dir>/checkpoints``), so ``--ckpt_path last`` finds the file.
            signals: Signal names that mean "save and stop" (e.g. SLURM's ``--signal``).
        """
        unknown = [name for name in signals if not hasattr(signal, name)]
        if unknown:
            raise ValueError(f"PreemptionCheckpoint.signals: unknown signal names {unknown}.")
        self.dirpath = dirpath
        self.signals = tuple(signals)
        self.received: str | None = None
        self.preempted = False  # set on every rank once the checkpoint is written
        self._previous_handlers: dict[int, object] = {}
        # The step whose validation the preemption skipped (saved in the checkpoint): the
        # resumed run validates it before training on, since Lightning's restart would not.
        self.validation_pending_at: int | None = None

    def state_dict(self) -> dict:
        return {"validation_pending_at": self.validation_pending_at}

    def load_state_dict(self, state_dict: dict) -> None:
        self.validation_pending_at = state_dict.get("validation_pending_at")

    # Installed at train start: Lightning registers its own SIGTERM handler just before, in fit.
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.received, self.preempted = None, False
        for name in self.signals:
            number = getattr(signal, name)
            self._previous_handlers[number] = signal.signal(number, self._handle)
        # Cleared first: a checkpoint saved during this validation (last.ckpt) must not ask for it again.
        pending, self.validation_pending_at = self.validation_pending_at, None
        if pending is not None and pending == trainer.global_step:
            log.warning(
                "Resumed at step %d, whose validation the preemption skipped: validating it now.",
                trainer.global_step,
            )
            run_validation_now(trainer)

    def _handle(self, number: int, frame) -> None:
        # Only a flag: the handler runs between two bytecodes, anywhere in the step.
        self.received = signal.Signals(number).name

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        if accumulating(trainer):
            # Mid-way through accumulate_grad_batches: the gradients gathered so far are in no
            # checkpoint while the data position counts their batches, so a save now would drop
            # them. The save waits for the optimizer step (every rank is at the same micro-batch).
            return
        # Every rank takes part in the decision every step, whichever rank got the signal.
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        path = self.checkpoint_path(trainer)
        # A step Lightning would validate now (val_check_interval): that validation is skipped
        # below, within the grace period, and a restart would step past it; the checkpoint says so.
        validates = validates_after_this_step(trainer)
        self.validation_pending_at = trainer.global_step if validates else None
        trainer.save_checkpoint(path)
        self.validation_pending_at = None
        trainer.strategy.barrier("preemption_checkpoint")
        log.warning(
            "%s received: saved %s at step %d; resume with `fit --ckpt_path last`.",
            self.received or "a preemption signal (on another rank)",
            path,
            trainer.global_step,
        )
        requeue_signal = slurm_requeue_signal(trainer)
        got_requeue_signal = requeue_signal is not None and self.received == requeue_signal
        if trainer.strategy.reduce_boolean_decision(got_requeue_signal, all=False) and trainer.is_global_zero:
            for logger in trainer.loggers:  # flushed before the job can be killed, as Lightning does
                logger.save()
            requeue_slurm_job()
        trainer.should_stop = True
        self.preempted = True
        # Lightning validates before a requested stop (meant for early stopping): a full
        # evaluation inside the grace period would risk the kill. The checkpoint is written.
        skip_next_validation(trainer)

    def checkpoint_path(self, trainer: Trainer) -> Path:
        if self.dirpath is not None:
            folder = Path(self.dirpath)
        elif trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
            folder = Path(trainer.checkpoint_callback.dirpath)
        else:
            folder = Path(trainer.default_root_dir) / "checkpoints"
        return folder / CHECKPOINT_NAME

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        self._previous_handlers = {}


def slurm_requeue_signal(trainer: Trainer) -> str | None:
    """The signal name that asks to requeue, when the run is a SLURM job with auto-requeue on."""
    # Where Lightning's own signal set-up reads it (single-device strategies have no attribute).
    environment = cluster_environment(trainer)
    if not (isinstance(environment, SLURMEnvironment) and environment.auto_requeue):
        return None
    return signal.Signals(environment.requeue_signal).name


def requeue_slurm_job() -> None:
    """``scontrol requeue`` this job (array task included), as Lightning's SLURM handler does."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    if not re.fullmatch(r"[0-9_]+", job):
        log.warning("Not requeuing: unexpected SLURM job id %r.", job)
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], check=False, timeout=60).returncode
    except FileNotFoundError:
        result = "scontrol not found"
    except subprocess.TimeoutExpired:
        result = "scontrol did not answer in 60 s"
    if result == 0:
        log.warning("Requeued SLURM job %s: it continues from the checkpoint when it starts again.", job)
    else:
        log.warning("Requeuing SLURM job %s failed (%s): resubmit it to continue.", job, result)
