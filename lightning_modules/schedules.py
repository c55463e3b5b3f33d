"""Learning-rate schedules usable as ``lr_scheduler`` classes in configs."""

from __future__ import annotations

import logging
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from errors import ConfigError

log = logging.getLogger(__name__)

# Of a run too short for the configured warm-up, this fraction warms up.
SHORT_RUN_WARMUP_FRACTION = 0.1


def warmup_length(warmup_steps: int | float, total_steps: int) -> int:
    """Steps of warm-up for a run of ``total_steps``: a fraction (0 <= x < 1) of them, or a count.

    A count that does not fit the run (a quick ``--trainer.max_steps=30`` of a recipe that warms
    up over 100) becomes a tenth of the run, with a warning, rather than stopping the run.
    """
    if total_steps < 1:
        raise ConfigError(
            f"WarmupCosine: total_steps={total_steps}; set trainer.max_steps (the schedule's length) "
            "to a positive number of steps."
        )
    if isinstance(warmup_steps, float) and not warmup_steps.is_integer():
        if not 0 <= warmup_steps < 1:
            raise ConfigError(
                f"WarmupCosine: warmup_steps={warmup_steps}: a fraction of the run is between 0 and 1, "
                "a number of steps is a whole number."
            )
        return int(warmup_steps * total_steps)
    if warmup_steps < 0:
        raise ConfigError(f"WarmupCosine: warmup_steps={warmup_steps} must be >= 0.")
    if warmup_steps < total_steps:
        return int(warmup_steps)
    shortened = int(SHORT_RUN_WARMUP_FRACTION * total_steps)
    log.warning(
        "WarmupCosine: warmup_steps=%d does not fit a run of total_steps=%d; warming up over %d steps "
        "(a tenth of the run) instead. Set warmup_steps to a number or a fraction (e.g. 0.1) to choose.",
        warmup_steps,
        total_steps,
        shortened,
    )
    return shortened


class WarmupCosine(LambdaLR):
    """Linear warm-up to the base learning rate, then cosine decay to ``min_ratio`` of it."""

    def __init__(
        self, optimizer: Optimizer, warmup_steps: int | float, total_steps: int, min_ratio: float = 0.0
    ):
        """
        Args:
            optimizer: The wrapped optimizer.
            warmup_steps: Steps of linear warm-up from 0, or a fraction of total_steps (e.g. 0.1);
                a count not below total_steps becomes a tenth of the run, with a warning.
            total_steps: Step at which the decay reaches min_ratio (e.g. ${trainer.max_steps}).
            min_ratio: Final learning rate as a fraction of the base one.
        """
        warmup = warmup_length(warmup_steps, total_steps)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / (total_steps - warmup))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        super().__init__(optimizer, factor)


def optimizer_config(parameters, optimizer_factory=None, lr_scheduler_factory=None):
    """What ``configure_optimizers`` returns: the optimizer factory (default AdamW, lr 1e-4) over
    ``parameters`` (tensors or groups), with the scheduler factory's scheduler stepped every step."""
    import torch

    factory = optimizer_factory or (lambda params: torch.optim.AdamW(params, lr=1e-4))
    optimizer = factory(parameters)
    if lr_scheduler_factory is None:
        return optimizer
    scheduler = lr_scheduler_factory(optimizer)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
