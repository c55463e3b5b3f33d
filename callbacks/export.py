"""Exports the best text encoder of a run as a Hugging Face folder a later stage can load by path."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from callbacks.preemption import PreemptionCheckpoint

log = logging.getLogger(__name__)


class ExportTextEncoder(Callback):
    """At the end of ``fit``, writes the text encoder (best checkpoint by default) with ``save_pretrained``.

    The folder is what ``configs/late_fusion.yaml`` names as its frozen text tower, so the
    text-only stage hands its result to the speech stages without any conversion step.
    """

    def __init__(
        self, dirpath: str, use_best: bool = True, num_layers: int | None = None, rank: int | None = None
    ):
        """
        Args:
            dirpath: Output folder (config.json, weights, tokenizer; LoRA also as lora_adapter/).
            use_best: Export the weights of the best checkpoint (ModelCheckpoint's monitor), else the last.
            num_layers: Export the early exit at this depth (one of model.matryoshka_layers): the
                first layers and the final norm, ``config.num_hidden_layers`` set to it; None: all.
            rank: With text_encoder.embedding_ranks, the token-table rank exported (dense in the
                folder, and its factors in embedding_factors.safetensors, which
                ``lightning_modules.components.text_encoder.load_factorised`` loads); None: the full.
        """
        self.dirpath = dirpath
        self.use_best = use_best
        self.num_layers = num_layers
        self.rank = rank

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not hasattr(pl_module, "export_text_encoder"):
            raise TypeError(
                f"{type(pl_module).__name__} has no export_text_encoder(); remove ExportTextEncoder."
            )
        if was_preempted(trainer, "the text encoder"):
            return
        options = {"num_layers": self.num_layers, "rank": self.rank}
        with best_weights(trainer, pl_module, self.use_best) as source:
            pl_module.export_text_encoder(
                Path(self.dirpath), **{k: v for k, v in options.items() if v is not None}
            )
        depth = "" if self.num_layers is None else f" at its {self.num_layers}-layer exit"
        depth += "" if self.rank is None else f" with its token table at rank {self.rank}"
        log.info("Exported the text encoder%s (%s) to %s", depth, source, self.dirpath)


def was_preempted(trainer: Trainer, what: str) -> bool:
    """Whether the fit ended on a preemption signal (then ``what`` is not exported: a later stage
    would load a half-trained model as if it were the result)."""
    if not any(isinstance(c, PreemptionCheckpoint) and c.preempted for c in trainer.callbacks):
        return False
    log.warning(
        "Not exporting %s: the run was preempted at step %d; the resumed run exports it when it ends.",
        what,
        trainer.global_step,
    )
    return True


@contextmanager
def best_weights(trainer: Trainer, pl_module: LightningModule, use_best: bool = True) -> Iterator[str]:
    """Inside, the module holds the trainable weights of the best checkpoint (the first
    ModelCheckpoint's ``best_model_path``) and yields that path; after, its own again. Without a
    best checkpoint (no validation yet, or ``use_best`` false) it yields ``"last weights"``."""
    best = getattr(trainer.checkpoint_callback, "best_model_path", "") if use_best else ""
    if not best:
        yield "last weights"
        return
    trainable = {name for name, p in pl_module.named_parameters() if p.requires_grad}
    current = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items() if k in trainable}
    pl_module.load_state_dict(
        torch.load(best, map_location="cpu", weights_only=True)["state_dict"], strict=False
    )
    try:
        yield best
    finally:
        pl_module.load_state_dict(current, strict=False)
