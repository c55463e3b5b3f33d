"""The callbacks every trainable model adds itself (``configure_callbacks``), so no recipe forgets them."""

from __future__ import annotations

from lightning.pytorch import Callback

from callbacks.checkpoint_files import AtomicCheckpoints
from callbacks.exact_resume import ExactResume
from callbacks.tensorboard_run import TensorBoardRun
from callbacks.training_guards import BatchGuard, StopAtLastStep, TrainingSetupCheck


def every_run_callbacks(guard: BatchGuard) -> list[Callback]:
    """The model's own ``guard`` (its ``training_step`` asks it), exact resume, the last step
    validated and saved, the set-up warnings, checkpoints written atomically, the TensorBoard run."""
    return [
        guard,
        ExactResume(),
        StopAtLastStep(),
        TrainingSetupCheck(),
        AtomicCheckpoints(),
        TensorBoardRun(),
    ]
