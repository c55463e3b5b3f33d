"""Text queries, text documents, one text embedder: the first stage of the reference recipe."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from errors import ConfigError
from lightning_modules.base import MatryoshkaEmbedder
from lightning_modules.components.early_exit import nested_slices
from lightning_modules.components.text_encoder import TextEncoderConfig, text_tower
from lightning_modules.nested_layers import nested_layer_exits


class TextOnly(MatryoshkaEmbedder):
    """Fine-tunes a Matryoshka text embedder (fully, or with LoRA) on text-query -> document pairs."""

    def __init__(self, text_encoder: TextEncoderConfig, matryoshka_layers: list[int] | None = None, **kwargs):
        """
        Args:
            text_encoder: The text model shared by queries and documents.
            matryoshka_layers: Early exits (layer counts, ascending) trained and evaluated beside the
                full depth, queries and documents alike (ML-Embed's nested layers; the loss must be
                ``lightning_modules.nested_layers.NestedLayers``). None: the full depth only.
        """
        super().__init__(**kwargs)
        self.text_encoder = text_tower(text_encoder, self.matryoshka_dims)
        self.exits = nested_layer_exits(self.loss, matryoshka_layers, self.text_encoder.num_layers)
        self.ranks = self.text_encoder.config.embedding_ranks  # nested token-table ranks, or None
        if self.ranks is not None:
            # An evaluation setting, not a trained one: LightningCLI lays a checkpoint's hyperparameters
            # over the command line, so `validate --ckpt_path X ...eval_rank=64` works only without it.
            self.hparams["text_encoder"]["embedding_ranks"].pop("eval_rank", None)

    @property
    def matryoshka_layers(self) -> list[int]:
        """Every depth the model embeds at: the early exits, then the full depth."""
        return [*self.exits, self.text_encoder.num_layers]

    # ----- nested embedding ranks: one drawn per training step, a fixed one for evaluation -------
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.ranks is not None:
            rank = self.ranks.draw(self.text_encoder.nested_ranks, self.global_step)
            self.text_encoder.set_embedding_rank(rank)
            self.log("train/embedding_rank", float(rank), batch_size=1)

    def _evaluation_rank(self) -> None:
        if self.ranks is not None:
            self.text_encoder.set_embedding_rank(self.ranks.eval_rank or self.ranks.rank)

    def on_validation_epoch_start(self) -> None:
        self._evaluation_rank()

    def on_test_epoch_start(self) -> None:
        self._evaluation_rank()

    def on_predict_epoch_start(self) -> None:
        self._evaluation_rank()

    def _embed(self, inputs: Mapping) -> dict:
        pooled = self.text_encoder.forward_exits(self.exits, **inputs)
        return nested_slices(pooled, self.text_encoder.num_layers, self.matryoshka_dims)

    def embed_queries(self, batch: Mapping) -> dict[int, torch.Tensor]:
        return self._embed(batch["query_text"])

    def embed_documents(self, batch: Mapping) -> dict[int, torch.Tensor]:
        return self._embed(batch["document"])

    def export_text_encoder(
        self, directory: str | Path, num_layers: int | None = None, rank: int | None = None
    ) -> None:
        """Writes the trained text model as a from_pretrained folder a later stage can name
        (``num_layers``: only its first layers and the final norm, the early exit at that depth;
        ``rank``: the token table at that nested rank, see ``TextEncoder.save_pretrained``)."""
        if num_layers is not None and num_layers not in self.matryoshka_layers:
            raise ConfigError(
                f"export at layer {num_layers}: not one of the trained depths {self.matryoshka_layers} "
                "(model.matryoshka_layers and the full depth)."
            )
        self.text_encoder.save_pretrained(directory, num_layers=num_layers, rank=rank)
