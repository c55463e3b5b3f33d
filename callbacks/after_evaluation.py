"""Base of the evaluations that run once after ``validate`` or ``test`` on a trained model (n-shot
classification, prompt x task): off unless configured, one process, gradients allowed.

They embed eval sets again (``callbacks.eval_set_embeddings``) after Lightning's loop has scored
them, so they are not run while fitting (each costs many validations); Lightning's evaluation loop
runs under ``torch.inference_mode``, which they leave for their own work (n-shot trains).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from callbacks.eval_set_embeddings import EvalSetEmbedder
from callbacks.tensorboard_run import tensorboard_loggers
from errors import ConfigError

log = logging.getLogger(__name__)


class AfterEvaluation(Callback):
    """Calls ``run(trainer, module, stage)`` at the end of ``validate`` (stage ``val``) and ``test``."""

    key = ""
    """The callback's top-level CLI key (named in messages)."""

    @property
    def enabled(self) -> bool:
        raise NotImplementedError

    def run(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        raise NotImplementedError

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self.enabled:
            return
        if stage == "fit":
            log.info("%s runs after `validate` or `test`, not while fitting: skipped in this fit.", self.key)
        elif trainer.world_size > 1:
            raise ConfigError(f"{self.key} runs in one process; run validate/test with --trainer.devices=1.")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.enabled and trainer.state.fn == "validate":
            self._run(trainer, pl_module, "val")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.enabled:
            self._run(trainer, pl_module, "test")

    def _run(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        training = pl_module.training
        with torch.inference_mode(False):
            try:
                self.run(trainer, pl_module, stage)
            finally:
                pl_module.train(training)

    @staticmethod
    def embedder(trainer: Trainer, pl_module: LightningModule) -> EvalSetEmbedder:
        data = trainer.datamodule
        return EvalSetEmbedder(pl_module, data.batches, data.hparams.eval_batch_size)

    @staticmethod
    def tensorboard(trainer: Trainer):
        """The run's SummaryWriter, or None without a TensorBoard logger."""
        loggers = tensorboard_loggers(trainer)
        return loggers[0].experiment if loggers else None

    @staticmethod
    def output_dir(trainer: Trainer, name: str) -> Path:
        """``<TensorBoard run folder>/<name>`` (the trainer's root without one), created."""
        loggers = tensorboard_loggers(trainer)
        root = Path(loggers[0].log_dir) if loggers else Path(trainer.default_root_dir)
        (root / name).mkdir(parents=True, exist_ok=True)
        return root / name
