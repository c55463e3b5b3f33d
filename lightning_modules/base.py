"""Base of every model: the embedding contract, the training and evaluation steps, the optimizer.

A model builds its components in ``__init__`` and implements ``embed_queries`` / ``embed_documents``
(and ``embed_transcriptions`` when its loss aligns queries to transcriptions), each returning
``{dim: [B, dim]}`` for every Matryoshka dim from one pass. The loss is an injected module
(``losses.py``); GradCache computes the same embeddings chunk by chunk (``grad_cache.py``); the
batch guards, exact resume and whole-or-nothing checkpoints are callbacks the model adds itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from callbacks.model_callbacks import every_run_callbacks
from callbacks.training_guards import BatchGuard, skipped_step
from errors import ConfigError
from lightning_modules.components.matryoshka import validate_matryoshka_dims
from lightning_modules.document_cache import CachedDocuments, document_keys
from lightning_modules.frozen_towers import FrozenTowers
from lightning_modules.grad_cache import chunked_embeddings
from lightning_modules.hard_negatives import embed_documents_and_negatives
from lightning_modules.losses import EmbeddingLoss, LossInputs, MatryoshkaInfoNCE, loss_from_config
from lightning_modules.schedules import optimizer_config
from lightning_modules.weight_decay import parameter_groups

Embeddings = dict[int, torch.Tensor]


class MatryoshkaEmbedder(FrozenTowers, CachedDocuments):
    """Base of every model: ``embed_queries`` / ``embed_documents`` -> ``{dim: [B, dim]}`` unit vectors."""

    def __init__(
        self,
        matryoshka_dims: Sequence[int] = (128, 256, 512, 1024),
        loss: EmbeddingLoss | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        gradient_chunk_size: int | None = None,
        document_cache: str | None = None,
    ):
        """
        Args:
            matryoshka_dims: Sorted embedding sizes trained and evaluated (each a usable prefix).
            loss: The training loss (default: ``lightning_modules.losses.MatryoshkaInfoNCE``).
            optimizer: Optimizer factory called on the trainable parameters (default AdamW, lr 1e-4).
            lr_scheduler: Optional scheduler factory called on the optimizer, stepped every step.
            gradient_chunk_size: GradCache: embed this many rows at a time, compute the loss on the
                whole batch, then backpropagate chunk by chunk; activation memory of one chunk,
                same gradients (None: the whole batch in one pass).
            document_cache: A folder for the frozen document tower's embeddings, computed once at
                the start of fit / validate / test and read from then on (None: no cache).
        """
        super().__init__()
        if isinstance(loss, Mapping):  # a checkpoint's hyperparameters (load_from_checkpoint)
            loss = loss_from_config(loss)
        self.save_hyperparameters(ignore=["loss", "optimizer", "lr_scheduler"])
        # Plain data in checkpoints (torch.load(weights_only=True) refuses our classes).
        for key, value in list(self.hparams.items()):
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                self.hparams[key] = dataclasses.asdict(value)
        self.matryoshka_dims = validate_matryoshka_dims(matryoshka_dims)
        self.loss = MatryoshkaInfoNCE() if loss is None else loss
        self.loss.check_dims(self.matryoshka_dims)
        self.hparams["loss"] = self.loss.config()
        if "transcriptions" in self.loss.needs and not self._overrides("embed_transcriptions"):
            raise ConfigError(
                f"model.loss aligns to transcriptions, which {type(self).__name__} cannot embed."
            )
        if gradient_chunk_size is not None and gradient_chunk_size < 1:
            raise ConfigError(f"model.gradient_chunk_size must be >= 1 or null, got {gradient_chunk_size}.")
        self.gradient_chunk_size = gradient_chunk_size
        self.document_cache_dir = document_cache
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.guard = BatchGuard()

    def _overrides(self, name: str) -> bool:
        return getattr(type(self), name) is not getattr(MatryoshkaEmbedder, name)

    # ----- the contract every model implements ----------------------------------------------
    def embed_queries(self, batch: Mapping) -> Embeddings:
        raise NotImplementedError

    def embed_documents(self, batch: Mapping) -> Embeddings:
        raise NotImplementedError

    def embed_transcriptions(self, batch: Mapping) -> Embeddings:
        """Alignment targets: the text tower's embedding of each query's transcription, no gradient."""
        raise NotImplementedError

    # ----- training ---------------------------------------------------------------------------
    def loss_inputs(self, batch: Mapping) -> LossInputs:
        """The embeddings the loss needs, whole or in GradCache chunks (same values and gradients)."""
        chunk, trainable = self.gradient_chunk_size, [p for p in self.parameters() if p.requires_grad]
        inputs = LossInputs(chunked_embeddings(self.embed_queries, batch, chunk, trainable))
        if "documents" in self.loss.needs:
            frozen = self.document_tower_frozen
            # Hard negatives, when the batch has any, share the documents' pass (and cache).
            inputs.documents, inputs.negatives = embed_documents_and_negatives(
                self.document_embeddings, batch, chunk, None if frozen else trainable
            )
            inputs.document_keys = document_keys(batch, inputs.queries)
        if "transcriptions" in self.loss.needs:
            inputs.transcriptions = self.embed_transcriptions(batch)
        return inputs

    def training_loss(self, batch: Mapping) -> torch.Tensor:
        """The loss of one batch, its embeddings computed as a training step computes them."""
        return self.loss(self.loss_inputs(batch))

    def training_step(self, batch: Mapping, batch_idx: int):
        if not self.guard.usable(batch, self.loss.min_rows(), self.device):
            return skipped_step(self.device)
        terms = self.loss.terms(self.loss_inputs(batch))
        loss = sum(terms.values())
        if not self.guard.finite(loss, batch):
            return skipped_step(self.device)
        rows = len(batch["ids"])
        self.log("train/loss", loss, prog_bar=True, batch_size=rows, sync_dist=True)
        for name, value in terms.items() if len(terms) > 1 else ():
            self.log(f"train/{name}_loss", value, batch_size=rows)
        if self.document_cache is not None:
            self.log("train/document_cache_misses", float(self.document_cache.misses), batch_size=1)
        return loss

    # ----- evaluation: embeddings out; the evaluator callback scores them -----------------------
    def evaluation_step(self, batch: Mapping, batch_idx: int = 0, dataloader_idx: int = 0) -> dict:
        embed = self.document_embeddings if batch["side"] == "corpus" else self.embed_queries
        embeddings = {dim: value.detach().float().cpu() for dim, value in embed(batch).items()}
        where = {"eval_set": batch["eval_set"], "side": batch["side"], "index": batch["index"].cpu()}
        return where | {"embeddings": embeddings}

    validation_step = test_step = predict_step = evaluation_step

    # ----- optimization, and the callbacks every run needs ----------------------------------
    def configure_optimizers(self):
        groups = parameter_groups(self)  # matrices decay; biases, norm gains, layer logits do not
        if not groups:
            raise ConfigError(
                f"{type(self).__name__} has no trainable parameters: check the freezing options."
            )
        return optimizer_config(groups, self.optimizer_factory, self.lr_scheduler_factory)

    def configure_callbacks(self):
        return every_run_callbacks(self.guard)  # however the Trainer was built
