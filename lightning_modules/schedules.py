"""Learning-rate schedules usable as ``lr_scheduler`` classes in configs."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from lightning_modules.components.errors import ConfigError


class WarmupCosine(LambdaLR):
    """Linear warm-up to the base learning rate, then cosine decay to ``min_ratio`` of it."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
        """
        Args:
            optimizer: The wrapped optimizer.
            warmup_steps: Steps of linear warm-up from 0.
            total_steps: Step at which the decay reaches min_ratio (e.g. ${trainer.max_steps}).
            min_ratio: Final learning rate as a fraction of the base one.
        """
        if total_steps <= warmup_steps:
            raise ConfigError(
                f"WarmupCosine: total_steps={total_steps} must exceed warmup_steps={warmup_steps}."
            )

        def factor(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        super().__init__(optimizer, factor)
