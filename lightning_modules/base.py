"""Shared LightningModule: the embedding interface, the Matryoshka InfoNCE step, optimizers, checkpoints.

Subclasses build their components in ``__init__`` and implement ``embed_queries`` /
``embed_documents``; everything else (training, evaluation outputs, optimizer over trainable
parameters only, trainable-only checkpoints) lives here once.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from errors import ConfigError, DataError
from lightning_modules import distributed
from lightning_modules.components.matryoshka import validate_matryoshka_dims
from lightning_modules.document_cache import tokenized_document_keys
from lightning_modules.grad_cache import chunked_no_grad, grad_cached_embeddings
from lightning_modules.losses import matryoshka_info_nce
from lightning_modules.random_state import collect_random_states, restore_random_states
from lightning_modules.weight_decay import parameter_groups, regroup_single_group_state

log = logging.getLogger(__name__)

# Stop rather than keep skipping: this many non-finite losses in a row means the run is broken.
MAX_CONSECUTIVE_NONFINITE = 20
# Likewise for batches left without two usable rows: the data cannot be used as configured
# (every audio path missing, a wrong column name), and skipping would run on to max_steps.
MAX_CONSECUTIVE_UNUSABLE_BATCHES = 50


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


class MatryoshkaEmbedder(LightningModule):
    """Base of every model: ``embed_queries`` / ``embed_documents`` -> ``{dim: [B, dim]}`` unit vectors."""

    def __init__(
        self,
        matryoshka_dims: Sequence[int] = (128, 256, 512, 1024),
        temperature: float = 0.05,
        loss_weights: dict[int, float] | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        cross_device_negatives: bool = True,
        gradient_chunk_size: int | None = None,
        symmetric_loss: bool = False,
    ):
        """
        Args:
            matryoshka_dims: Sorted embedding sizes trained and evaluated (each a usable prefix).
            temperature: InfoNCE softmax temperature on cosine similarities.
            loss_weights: Optional weight per dim in the summed loss (missing dims weigh 1).
            optimizer: Optimizer factory called on the trainable parameters (default AdamW, lr 1e-4).
            lr_scheduler: Optional scheduler factory called on the optimizer, stepped every step.
            cross_device_negatives: Under DDP, every rank's documents are negatives for every
                query (global batch); false: each rank contrasts its own batch only.
            gradient_chunk_size: GradCache: embed this many rows at a time, compute the loss on the
                whole batch, then backpropagate chunk by chunk; activation memory of one chunk,
                same gradients (None: the whole batch in one pass).
            symmetric_loss: Also score each document against the batch's queries (CLIP-style
                InfoNCE, the mean of both directions per dim); false: queries -> documents only.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        # Plain data in checkpoints: torch.load(weights_only=True), the default, refuses our
        # classes; the configs' ``coerce`` rebuilds them from these dicts.
        for key, value in list(self.hparams.items()):
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                self.hparams[key] = dataclasses.asdict(value)
        self.matryoshka_dims = validate_matryoshka_dims(matryoshka_dims)
        if temperature <= 0:
            raise ConfigError(f"model.temperature must be > 0, got {temperature}.")
        unknown = set(loss_weights or {}) - set(self.matryoshka_dims)
        if unknown:
            raise ConfigError(f"model.loss_weights names dims {sorted(unknown)} not in matryoshka_dims.")
        self.temperature = temperature
        self.loss_weights = dict(loss_weights or {})
        self.cross_device_negatives = cross_device_negatives
        self.symmetric_loss = symmetric_loss
        if gradient_chunk_size is not None and gradient_chunk_size < 1:
            raise ConfigError(f"model.gradient_chunk_size must be >= 1 or null, got {gradient_chunk_size}.")
        self.gradient_chunk_size = gradient_chunk_size
        # Attached by callbacks.document_cache.CacheFrozenDocuments when the document tower is frozen.
        self.document_cache = None
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.skipped_rows = 0
        self.nonfinite_losses = 0
        self.frozen_towers: list[str] = []  # attribute names of submodules kept in eval mode
        self._consecutive_nonfinite = 0
        self._consecutive_unusable = 0
        self._rng_states_to_restore: dict | None = None
        # Frozen backbones are left out of checkpoints (see on_save_checkpoint), so loading must
        # accept their absence; on_load_checkpoint checks that every trainable weight is there.
        self.strict_loading = False

    def freeze_tower(self, name: str) -> None:
        """Freezes submodule ``name``: no gradients, no optimizer state, eval mode (no dropout) always."""
        getattr(self, name).requires_grad_(False)
        self.frozen_towers.append(name)
        getattr(self, name).eval()

    def train(self, mode: bool = True):
        # Frozen towers stay in eval mode whatever Lightning asks of the module.
        super().train(mode)
        for name in getattr(self, "frozen_towers", ()):
            getattr(self, name).eval()
        return self

    def on_train_start(self) -> None:
        # Lightning has just warned "Found N module(s) in eval mode"; say which, and whether that
        # is intended (a frozen tower runs without dropout on purpose) or a trainable part left
        # in eval mode by mistake (its dropout would be off).
        if self.global_rank != 0:  # every rank holds the same modules
            return
        accumulate = self._trainer.accumulate_grad_batches if self._trainer is not None else 1
        if accumulate > 1 and self.contrasts_documents:
            log.warning(
                "trainer.accumulate_grad_batches=%d: each batch's InfoNCE still contrasts its own rows "
                "only, so this is not one batch %d times larger (fewer negatives). For a larger "
                "contrastive batch in the same memory, raise data.batch_size with "
                "model.gradient_chunk_size (GradCache).",
                accumulate,
                accumulate,
            )
        towers, others = eval_mode_modules(self)
        if others:
            log.warning(
                "%d module(s) in eval mode outside the frozen towers, so their dropout is off: %s",
                len(others),
                others[:10] + (["..."] if len(others) > 10 else []),
            )
        if towers:
            in_towers = sum(1 for module in self.modules() if not module.training) - len(others)
            log.info("The %d modules of the frozen towers %s run in eval mode on purpose.", in_towers, towers)

    # ----- the interface every model implements -------------------------------------------
    def embed_queries(self, batch: Mapping) -> dict[int, torch.Tensor]:
        raise NotImplementedError

    def embed_documents(self, batch: Mapping) -> dict[int, torch.Tensor]:
        raise NotImplementedError

    @property
    def document_tower_frozen(self) -> bool:
        """True when no trainable weight shapes a document's embedding (it can then be cached)."""
        return False

    def document_tower(self) -> torch.nn.Module | None:
        """The module whose frozen weights make the document embeddings (for cache fingerprints)."""
        return None

    @property
    def contrasts_documents(self) -> bool:
        """Whether the training loss needs the batch's documents (not for pure alignment objectives)."""
        return True

    @property
    def needs_transcriptions(self) -> bool:
        """Whether every speech training row needs its transcription (alignment objectives): the
        datamodule then skips and counts rows without one instead of failing the batch."""
        return False

    def document_embeddings(self, batch: Mapping) -> dict[int, torch.Tensor]:
        """``embed_documents``, read from the frozen-document cache when one is attached."""
        if self.document_cache is None:
            return self.embed_documents(batch)
        return self.document_cache.lookup(
            batch["document"], lambda document: self.embed_documents({"document": document})
        )

    # ----- training -----------------------------------------------------------------------
    def training_step(self, batch: Mapping, batch_idx: int):
        self._count_skipped_rows(batch)
        batch_size = len(batch["ids"])
        # Under DDP a step is skipped by every rank or by none: one rank returning None while the
        # others run backward would leave them waiting for its gradients forever.
        needed = 1 if self.cross_device_negatives and distributed.world_size() > 1 else 2
        if not distributed.all_ranks_agree(batch_size >= needed, self.device):
            log.warning("Skipping a training batch with %d usable rows (on some rank).", batch_size)
            self._consecutive_unusable += 1
            if self._consecutive_unusable >= MAX_CONSECUTIVE_UNUSABLE_BATCHES:
                reasons = sorted(set(batch.get("skip_reasons") or []))
                raise DataError(
                    f"{self._consecutive_unusable} training batches in a row had fewer than {needed} "
                    f"usable rows (this rank's last skip reasons: {reasons[:5]}): the training data "
                    "cannot be used as configured; check its columns, paths and the data.audio limits."
                )
            return self._skipped_step()
        self._consecutive_unusable = 0
        loss = self.training_loss(batch)
        if not distributed.all_ranks_agree(bool(torch.isfinite(loss)), self.device):
            return self._skip_nonfinite(batch)
        self._consecutive_nonfinite = 0
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=True)
        return loss

    def training_loss(self, batch: Mapping) -> torch.Tensor:
        """The batch's embeddings (whole, or GradCache chunks) scored by ``loss_from_embeddings``."""
        chunk = self.gradient_chunk_size
        rows = len(batch["ids"]) if chunk is not None else 0
        if chunk is None or chunk >= rows:
            queries = self.embed_queries(batch)
            documents = self.document_embeddings(batch) if self.contrasts_documents else None
            return self.loss_from_embeddings(batch, queries, documents)
        trainable = [p for p in self.parameters() if p.requires_grad]
        queries = grad_cached_embeddings(self.embed_queries, batch, rows, chunk, trainable)
        documents = None
        if self.contrasts_documents and self.document_tower_frozen:
            documents = chunked_no_grad(self.document_embeddings, batch, rows, chunk)
        elif self.contrasts_documents:
            documents = grad_cached_embeddings(self.embed_documents, batch, rows, chunk, trainable)
        return self.loss_from_embeddings(batch, queries, documents)

    def loss_from_embeddings(
        self,
        batch: Mapping,
        queries: Mapping[int, torch.Tensor],
        documents: Mapping[int, torch.Tensor] | None,
    ) -> torch.Tensor:
        """Matryoshka InfoNCE of the batch's queries against its documents (in-batch negatives)."""
        return self.contrastive_loss(batch, queries, documents)

    def contrastive_loss(
        self, batch: Mapping, queries: Mapping[int, torch.Tensor], documents: Mapping[int, torch.Tensor]
    ) -> torch.Tensor:
        """The model's InfoNCE settings (temperature, dim weights, cross-device negatives) applied;
        a copy of a row's own document elsewhere in the batch is not its negative."""
        return matryoshka_info_nce(
            queries,
            documents,
            self.temperature,
            self.loss_weights,
            self.cross_device_negatives,
            symmetric=self.symmetric_loss,
            document_keys=document_keys(batch, queries),
        )

    def _count_skipped_rows(self, batch: Mapping) -> None:
        skipped = batch.get("skipped_ids") or []
        if skipped:
            self.skipped_rows += len(skipped)
            reasons = batch.get("skip_reasons") or [""] * len(skipped)
            named = [
                f"{row_id} ({reason})" if reason else row_id
                for row_id, reason in zip(skipped, reasons, strict=True)
            ]
            log.warning("Skipped %d bad training rows (total %d): %s", len(skipped), self.skipped_rows, named)
        # Each rank counts its own rows; the logged value is the sum over ranks.
        self.log(
            "train/skipped_rows", float(self.skipped_rows), batch_size=1, sync_dist=True, reduce_fx="sum"
        )

    def _skip_nonfinite(self, batch: Mapping):
        self.nonfinite_losses += 1
        self._consecutive_nonfinite += 1
        if self._consecutive_nonfinite >= MAX_CONSECUTIVE_NONFINITE:
            raise RuntimeError(
                f"{self._consecutive_nonfinite} non-finite losses in a row (last batch ids "
                f"{batch['ids'][:8]}...): stopping before the weights are damaged; "
                "lower the learning rate or check the data."
            )
        log.warning("Non-finite loss on batch %s...: step skipped, weights untouched.", batch["ids"][:8])
        self.log("train/nonfinite_losses", float(self.nonfinite_losses), batch_size=1)
        return self._skipped_step()

    def _skipped_step(self) -> torch.Tensor | None:
        """What training_step returns for a step that must not change the weights.

        One process: None (Lightning skips backward and the optimizer step). Under DDP Lightning
        refuses None, so every rank returns a zero that is connected to no parameter: backward
        gives no parameter a gradient, and the optimizer leaves parameters without gradients
        (and their state) untouched.
        """
        if distributed.world_size() == 1:
            return None
        return torch.zeros((), device=self.device, requires_grad=True)

    # ----- evaluation: embeddings out, analysis in callbacks -------------------------------
    def _embed_eval_batch(self, batch: Mapping) -> dict:
        side = batch["side"]
        embed = self.document_embeddings if side == "corpus" else self.embed_queries
        embeddings = {dim: value.detach().float().cpu() for dim, value in embed(batch).items()}
        return {
            "eval_set": batch["eval_set"],
            "side": side,
            "index": batch["index"].cpu(),
            "embeddings": embeddings,
        }

    def validation_step(self, batch: Mapping, batch_idx: int, dataloader_idx: int = 0) -> dict:
        return self._embed_eval_batch(batch)

    def test_step(self, batch: Mapping, batch_idx: int, dataloader_idx: int = 0) -> dict:
        return self._embed_eval_batch(batch)

    def predict_step(self, batch: Mapping, batch_idx: int, dataloader_idx: int = 0) -> dict:
        return self._embed_eval_batch(batch)

    # ----- optimization -------------------------------------------------------------------
    def configure_optimizers(self):
        # Matrices decay, vectors (biases, norm gains, layer logits) do not: weight_decay.py.
        groups = parameter_groups(self)
        if not groups:
            raise ConfigError(
                f"{type(self).__name__} has no trainable parameters: check the freezing options."
            )
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(groups, lr=1e-4)
        else:
            optimizer = self.optimizer_factory(groups)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----- checkpoints: what training changes, not frozen backbones ------------------------
    def configure_callbacks(self):
        # Every checkpoint of every run is written whole or not at all, however the Trainer was built;
        # TensorBoard draws the scalars at the optimizer step the terminal prints, and a resumed run
        # writes on in its run's folder (callbacks/tensorboard_run.py).
        from callbacks.checkpoint_files import AtomicCheckpoints
        from callbacks.tensorboard_run import TensorBoardRun

        return [AtomicCheckpoints(), TensorBoardRun()]

    def _frozen_parameter_names(self) -> set[str]:
        return {name for name, p in self.named_parameters() if not p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        frozen = self._frozen_parameter_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        # Rank 0 writes the checkpoint, so what differs per rank is gathered (one collective):
        # - each rank counts the bad rows of its own share of the stream;
        # - Lightning restores weights, optimizer, loops and data position but not the random
        #   generators (dropout, LoRA dropout): without them a resumed run is not the same run;
        # - the loops hold rank 0's data position only, while every rank reads its own shards
        #   and stands elsewhere in them.
        per_rank = distributed.gather_objects(
            (self.skipped_rows, collect_random_states(), _fit_loop_state(checkpoint).get("combined_loader"))
        )
        skipped_rows, rng_states, loader_states = (list(values) for values in zip(*per_rank, strict=True))
        checkpoint["embedder_counters"] = {
            "skipped_rows_per_rank": skipped_rows,
            "nonfinite_losses": self.nonfinite_losses,
        }
        checkpoint["rng_states_per_rank"] = rng_states
        checkpoint["loader_states_per_rank"] = loader_states

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        missing = sorted(trainable - set(checkpoint["state_dict"]))
        if missing:
            raise ConfigError(
                f"The checkpoint lacks {len(missing)} trainable weights of {type(self).__name__} "
                f"(e.g. {missing[:3]}): it was written by a different model or freezing config."
            )
        counters = checkpoint.get("embedder_counters", {})
        per_rank = counters.get("skipped_rows_per_rank") or [counters.get("skipped_rows", 0)]
        if len(per_rank) == distributed.world_size():
            self.skipped_rows = per_rank[distributed.rank()]
        else:  # a different number of ranks: the total lives on rank 0, so the logged sum is kept
            self.skipped_rows = sum(per_rank) if distributed.rank() == 0 else 0
        self.nonfinite_losses = counters.get("nonfinite_losses", 0)
        if self._trainer is not None and self._trainer.state.fn == "fit":  # only fit loads the optimizer
            regroup_single_group_state(checkpoint, self)  # a run started before the decay groups
        self._restore_own_data_position(checkpoint)
        states = checkpoint.get("rng_states_per_rank") or []
        if len(states) == distributed.world_size():
            self._rng_states_to_restore = states[distributed.rank()]
        elif states:
            log.warning(
                "The checkpoint holds random states of %d ranks, this run has %d: not restoring them "
                "(dropout draws will differ from the original run).",
                len(states),
                distributed.world_size(),
            )

    def _restore_own_data_position(self, checkpoint: dict) -> None:
        """Puts this rank's saved data position where Lightning's loop restore will read it.

        Lightning restores the loops after this hook, from the same checkpoint dict. Only a
        resumed ``fit`` reads them (not ``load_from_checkpoint``, ``validate`` or ``test``).
        """
        trainer = self._trainer
        if trainer is None or trainer.state.fn != "fit":
            return
        positions = checkpoint.get("loader_states_per_rank")
        loop_state = _fit_loop_state(checkpoint)
        if not positions or "combined_loader" not in loop_state:
            return
        if len(positions) == distributed.world_size():
            loop_state["combined_loader"] = positions[distributed.rank()]
        elif distributed.rank() == 0:
            log.warning(
                "The checkpoint holds the data positions of %d ranks, this run has %d: the training "
                "stream is split differently now, so every rank starts from rank 0's position (rows "
                "may be seen twice or skipped).",
                len(positions),
                distributed.world_size(),
            )

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Restored just before the first resumed step: loading and loop set-up may draw numbers.
        if self._rng_states_to_restore is not None:
            restore_random_states(self._rng_states_to_restore)
            self._rng_states_to_restore = None

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Lightning validates every val_check_interval steps only, so a max_steps that is not a
        # multiple (55000 at 2000) ended the run untested, and the ModelCheckpoints, which save
        # after a validation, lost the steps since the last one. Stopping at the final step makes
        # Lightning validate once more (as for early stopping); then best and last are saved.
        max_steps = self.trainer.max_steps
        if max_steps is not None and max_steps > 0 and self.trainer.global_step >= max_steps:
            self.trainer.should_stop = True


def document_keys(batch: Mapping, queries: Mapping[int, torch.Tensor]) -> torch.Tensor | None:
    """The batch's ``document_keys`` (the batch builder hashes them), or hashed here for a batch
    built otherwise; None without documents."""
    keys = batch.get("document_keys") if isinstance(batch, Mapping) else None
    if keys is None and isinstance(batch, Mapping) and batch.get("document") is not None:
        keys = tokenized_document_keys(batch["document"])
    return None if keys is None else keys.to(next(iter(queries.values())).device)


def _fit_loop_state(checkpoint: dict) -> dict:
    """The fit loop's own state in a Lightning checkpoint (where the dataloader position lives)."""
    return checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
