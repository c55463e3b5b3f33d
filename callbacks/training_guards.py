"""Guards every model adds itself (``MatryoshkaEmbedder.configure_callbacks``), so no recipe forgets them.

- ``BatchGuard``: bad training rows are named and counted; a batch without enough usable rows, or
  whose loss is not finite, leaves the weights untouched; when either repeats, the run stops with
  the reason instead of skipping on until ``max_steps``.
- ``StopAtLastStep``: the last step (``max_steps``, or the data's last batch) is validated and
  checkpointed.
- ``TrainingSetupCheck``: says which modules run in eval mode and whether that is intended, and
  what gradient accumulation does to a contrastive batch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from lightning.pytorch import Callback

import collectives
from callbacks.lightning_internals import is_last_batch
from errors import DataError

log = logging.getLogger(__name__)


class BatchGuard(Callback):
    """Counts skipped rows; ``usable`` / ``finite`` decide (on every rank alike) whether a step runs."""

    def __init__(self, max_unusable_in_a_row: int = 50, max_nonfinite_in_a_row: int = 20):
        """
        Args:
            max_unusable_in_a_row: Batches in a row with too few usable rows before the run stops
                (the data cannot be used as configured: every audio path missing, a wrong column).
            max_nonfinite_in_a_row: Non-finite losses in a row before the run stops (it is broken).
        """
        self.max_unusable_in_a_row = max_unusable_in_a_row
        self.max_nonfinite_in_a_row = max_nonfinite_in_a_row
        self.skipped_rows = 0
        self.nonfinite_losses = 0
        self._unusable_in_a_row = 0
        self._nonfinite_in_a_row = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        skipped = batch.get("skipped_ids") or [] if isinstance(batch, Mapping) else []
        if skipped:
            self.skipped_rows += len(skipped)
            reasons = batch.get("skip_reasons") or [""] * len(skipped)
            named = [f"{row} ({why})" if why else row for row, why in zip(skipped, reasons, strict=True)]
            log.warning("Skipped %d bad training rows (total %d): %s", len(skipped), self.skipped_rows, named)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # Each rank counts its own rows; the logged value is the sum over ranks.
        pl_module.log(
            "train/skipped_rows", float(self.skipped_rows), batch_size=1, sync_dist=True, reduce_fx="sum"
        )
        if self.nonfinite_losses:
            pl_module.log("train/nonfinite_losses", float(self.nonfinite_losses), batch_size=1)

    def usable(self, batch: Mapping, needed: int, device: torch.device) -> bool:
        """Whether every rank's batch has ``needed`` rows (a collective: every rank asks)."""
        rows = len(batch["ids"])
        # One rank skipping backward while the others run it would leave them waiting forever.
        if collectives.all_ranks_agree(rows >= needed, device):
            self._unusable_in_a_row = 0
            return True
        log.warning("Skipping a training batch with %d usable rows (on some rank).", rows)
        self._unusable_in_a_row += 1
        if self._unusable_in_a_row >= self.max_unusable_in_a_row:
            reasons = sorted(set(batch.get("skip_reasons") or []))
            raise DataError(
                f"{self._unusable_in_a_row} training batches in a row had fewer than {needed} usable rows "
                f"(this rank's last skip reasons: {reasons[:5]}): the training data cannot be used as "
                "configured; check its columns, paths and the data.audio limits."
            )
        return False

    def finite(self, loss: torch.Tensor, batch: Mapping) -> bool:
        """Whether the loss is finite on every rank (a collective)."""
        if collectives.all_ranks_agree(bool(torch.isfinite(loss)), loss.device):
            self._nonfinite_in_a_row = 0
            return True
        self.nonfinite_losses += 1
        self._nonfinite_in_a_row += 1
        if self._nonfinite_in_a_row >= self.max_nonfinite_in_a_row:
            ids = batch["ids"][:8]
            raise RuntimeError(
                f"{self._nonfinite_in_a_row} non-finite losses in a row (last batch ids {ids}...): "
                "stopping before the weights are damaged; lower the learning rate or check the data."
            )
        log.warning("Non-finite loss on batch %s...: step skipped, weights untouched.", batch["ids"][:8])
        return False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # Rank 0 writes the checkpoint; each rank counted the bad rows of its own share (one collective).
        checkpoint["embedder_counters"] = {
            "skipped_rows_per_rank": collectives.gather_objects(self.skipped_rows),
            "nonfinite_losses": self.nonfinite_losses,
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        counters = checkpoint.get("embedder_counters", {})
        per_rank = counters.get("skipped_rows_per_rank") or [0]
        if len(per_rank) == collectives.world_size():
            self.skipped_rows = per_rank[collectives.rank()]
        else:  # a different number of ranks: the total lives on rank 0, so the logged sum is kept
            self.skipped_rows = sum(per_rank) if collectives.rank() == 0 else 0
        self.nonfinite_losses = counters.get("nonfinite_losses", 0)


def skipped_step(device: torch.device) -> torch.Tensor | None:
    """What ``training_step`` returns for a step that must not change the weights.

    One process: None (Lightning skips backward and the optimizer step). Under DDP Lightning
    refuses None, so every rank returns a zero that is connected to no parameter: backward gives
    no parameter a gradient, and the optimizer leaves parameters without gradients untouched.
    """
    if collectives.world_size() == 1:
        return None
    return torch.zeros((), device=device, requires_grad=True)


class StopAtLastStep(Callback):
    """Stops at the final step so that Lightning validates it and the checkpoints save it.

    Lightning validates every ``val_check_interval`` steps only: a ``max_steps`` that is not a
    multiple (55000 at 2000), or the end of the data's passes, would end the run untested, and the
    ModelCheckpoints (which save after a validation) would lose the steps since the last one.
    The training stream is one Lightning epoch (every pass, or endless): a second epoch would read
    the data afresh from its first pass, and a run resumed after the last batch must end.
    """

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.max_epochs not in (None, -1, 1):
            log.warning(
                "trainer.max_epochs=%s is ignored: the training stream is one epoch; set data.passes "
                "to read the data several times.",
                trainer.max_epochs,
            )
        trainer.fit_loop.max_epochs = 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        max_steps = trainer.max_steps
        if (max_steps is not None and 0 < max_steps <= trainer.global_step) or is_last_batch(trainer):
            trainer.should_stop = True


def eval_mode_modules(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Modules in eval mode: (the frozen towers holding them, the names of all others).

    A frozen tower is a module in eval mode whose parameters are all frozen; everything inside it
    is in eval mode on purpose. Any other module in eval mode while training is not.
    """
    towers: list[str] = []
    others: list[str] = []
    for name, module in model.named_modules():
        if module.training or any(name.startswith(f"{tower}.") for tower in towers):
            continue
        parameters = list(module.parameters())
        if parameters and not any(p.requires_grad for p in parameters):
            towers.append(name)
        else:
            others.append(name or "the model itself")
    return towers, others


class TrainingSetupCheck(Callback):
    """Warnings at the start of training about settings that train differently than they read."""

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:  # every rank holds the same modules and settings
            return
        accumulate = trainer.accumulate_grad_batches
        if accumulate > 1 and "documents" in pl_module.loss.needs:
            log.warning(
                "trainer.accumulate_grad_batches=%d: each batch's InfoNCE still contrasts its own rows "
                "only, so this is not one batch %d times larger (fewer negatives). For a larger "
                "contrastive batch in the same memory, raise data.batch_size with "
                "model.gradient_chunk_size (GradCache).",
                accumulate,
                accumulate,
            )
        # Lightning has just warned "Found N module(s) in eval mode"; say which, and whether that is
        # intended (a frozen tower runs without dropout on purpose) or a trainable part left in
        # eval mode by mistake (its dropout would be off).
        towers, others = eval_mode_modules(pl_module)
        if others:
            log.warning(
                "%d module(s) in eval mode outside the frozen towers, so their dropout is off: %s",
                len(others),
                others[:10] + (["..."] if len(others) > 10 else []),
            )
        if towers:
            in_towers = sum(1 for module in pl_module.modules() if not module.training) - len(others)
            log.info("The %d modules of the frozen towers %s run in eval mode on purpose.", in_towers, towers)
