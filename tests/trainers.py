"""The tests' Lightning Trainer: CPU, and quiet (no logger, progress bar or model summary); and a
callback that preempts a run at a chosen step."""

from __future__ import annotations

import tempfile

from lightning.pytorch import Callback, Trainer

from callbacks.preemption import PreemptionCheckpoint


def quiet_cpu_trainer(**options) -> Trainer:
    """A Trainer on the CPU that writes no logs and prints no progress; ``options`` add the rest.
    Without a ``default_root_dir`` it gets a fresh temporary one: Lightning's default checkpoint
    folder is otherwise ./checkpoints, the repository itself when pytest runs from its root."""
    quiet = {
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    if "default_root_dir" not in options:
        quiet["default_root_dir"] = tempfile.mkdtemp(prefix="quiet-trainer-")
    return Trainer(**quiet | options)


class PreemptAt(Callback):
    """Raises the preemption flag during step ``step``, as the signal handler would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step - 1:
            (preemption,) = [cb for cb in trainer.callbacks if isinstance(cb, PreemptionCheckpoint)]
            preemption.received = "SIGTERM"
