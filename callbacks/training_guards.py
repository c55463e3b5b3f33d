"""Guards every trainable model adds itself (``callbacks.model_callbacks``), so no recipe forgets them.

- ``BatchGuard``: bad training rows are counted, and named once (at their first skip); a summary
  by kind follows each pass over the data and ends fit; a batch without enough usable rows, or
  whose loss is not finite, leaves the weights untouched; when either repeats, the run stops with
  the reason instead of skipping on until ``max_steps``.
- ``StopAtLastStep``: the last step (``max_steps``, or the data's last batch) is validated and
  checkpointed.
- ``TrainingSetupCheck``: says which modules run in eval mode and whether that is intended, and
  what gradient accumulation does to a contrastive batch.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping

import torch
from lightning.pytorch import Callback

import collectives
from callbacks.lightning_internals import is_last_batch
from errors import DataError

log = logging.getLogger(__name__)


class BatchGuard(Callback):
    """Counts skipped rows; ``usable`` / ``finite`` decide (on every rank alike) whether a step runs.

    A skipped row (``batch["skipped_ids"]``, with ``skip_reasons`` and ``skip_kinds``) is named
    with its reason in a warning the first time only: read again in a later pass, it is counted,
    not named again. After each pass over the data (``batch["data_pass"]`` moves on) an info line,
    and at the end of fit a warning, sums up the skips by kind. Each rank counts and names the rows
    of its own share; the counts, and the ids already named, resume from a checkpoint.
    """

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
        self.skips_by_kind: Counter[str] = Counter()
        """Skipped rows (every skip, repeats included) by kind: ``silent``, ``undecodable audio``..."""
        self.named_rows: set[str] = set()
        """Ids of the skipped rows already named in a warning."""
        self.nonfinite_losses = 0
        self._unusable_in_a_row = 0
        self._nonfinite_in_a_row = 0
        self._data_pass: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if not isinstance(batch, Mapping):
            return
        data_pass = batch.get("data_pass")
        if data_pass is not None:
            if self._data_pass is not None and data_pass > self._data_pass and self.skipped_rows:
                log.info("%s", self.summary(f"after pass {self._data_pass + 1} over the training data"))
            self._data_pass = data_pass
        skipped = batch.get("skipped_ids") or []
        if not skipped:
            return
        self.skipped_rows += len(skipped)
        reasons = batch.get("skip_reasons") or [""] * len(skipped)
        self.skips_by_kind.update(batch.get("skip_kinds") or [why or "no reason given" for why in reasons])
        first = [(row, why) for row, why in zip(skipped, reasons, strict=True) if row not in self.named_rows]
        self.named_rows.update(row for row, _ in first)
        if first:
            named = [f"{row} ({why})" if why else row for row, why in first]
            again = len(skipped) - len(first)
            log.warning(
                "Skipped %d bad training rows (total %d): %s%s",
                len(skipped),
                self.skipped_rows,
                named,
                f" and {again} named before" if again else "",
            )

    def summary(self, when: str) -> str:
        """One line: the rows skipped so far, by kind, and how many distinct rows were named."""
        kinds = "; ".join(f"{kind}: {count}" for kind, count in self.skips_by_kind.most_common())
        rows = f"{len(self.named_rows)} distinct row" + ("" if len(self.named_rows) == 1 else "s")
        return (
            f"Skipped training rows {when}: {self.skipped_rows} in all ({kinds}), {rows}, each named "
            "in a warning at its first skip only."
        )

    def on_train_end(self, trainer, pl_module) -> None:
        if self.skipped_rows:
            log.warning("%s", self.summary("in this fit"))

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
        # Plain types only: checkpoints load with torch.load(weights_only=True).
        per_rank = collectives.gather_objects(
            (self.skipped_rows, dict(self.skips_by_kind), sorted(self.named_rows))
        )
        checkpoint["embedder_counters"] = {
            "skipped_rows_per_rank": [rows for rows, _, _ in per_rank],
            "skips_by_kind_per_rank": [kinds for _, kinds, _ in per_rank],
            "named_rows_per_rank": [named for _, _, named in per_rank],
            "nonfinite_losses": self.nonfinite_losses,
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        counters = checkpoint.get("embedder_counters", {})
        per_rank = counters.get("skipped_rows_per_rank") or [0]
        kinds = counters.get("skips_by_kind_per_rank") or [{}] * len(per_rank)
        named = counters.get("named_rows_per_rank") or [[]] * len(per_rank)
        if len(per_rank) == collectives.world_size():
            self.skipped_rows = per_rank[collectives.rank()]
            self.skips_by_kind = Counter(kinds[collectives.rank()])
            self.named_rows = set(named[collectives.rank()])
        else:  # a different number of ranks: the totals live on rank 0, so the logged sum is kept
            first = collectives.rank() == 0
            self.skipped_rows = sum(per_rank) if first else 0
            self.skips_by_kind = sum((Counter(k) for k in kinds), Counter()) if first else Counter()
            # Rows move between ranks' shares: a row named by any rank is not named again.
            self.named_rows = set().union(*named)
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
