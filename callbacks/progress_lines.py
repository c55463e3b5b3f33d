"""A log line every N optimizer steps: progress where no progress bar draws.

Lightning's progress bar draws on a terminal only (its rich bar prints nothing to a file or a
pipe), so a run whose output is logged, or a child process such as the demo's text stage, would
say nothing between validations. Each line gives the step, the loss, the time per step and about
how long is left until ``trainer.max_steps``.
"""

from __future__ import annotations

import logging
import time

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


class ProgressLines(Callback):
    """Logs ``step N/M (P %), loss L, S s/step, about T min left`` every ``every_n_steps`` steps."""

    def __init__(self, every_n_steps: int = 50):
        """
        Args:
            every_n_steps: Optimizer steps between two lines.
        """
        self.every_n_steps = every_n_steps
        self._start: tuple[float, int] | None = None
        self._last_line = -1  # a step's batches all end at its number under gradient accumulation

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = (time.monotonic(), trainer.global_step)

    @rank_zero_only
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        step = trainer.global_step
        started, first = self._start or (time.monotonic(), step)
        if step == first or step % self.every_n_steps or step == self._last_line:
            return
        self._last_line = step
        per_step = (time.monotonic() - started) / (step - first)
        total, loss = trainer.max_steps, trainer.callback_metrics.get("train/loss")
        parts = [f"step {step}" + (f"/{total} ({100 * step / total:.0f} %)" if total > 0 else "")]
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        parts.append(f"{per_step:.2f} s/step")
        if total > 0:
            parts.append(f"about {(total - step) * per_step / 60:.0f} min left")
        log.info(", ".join(parts))
