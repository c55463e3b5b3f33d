"""The tests' Lightning Trainer: CPU, and quiet (no logger, progress bar or model summary)."""

from __future__ import annotations

from lightning.pytorch import Trainer


def quiet_cpu_trainer(**options) -> Trainer:
    """A Trainer on the CPU that writes no logs and prints no progress; ``options`` add the rest."""
    return Trainer(
        **{"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False}
        | options
    )
