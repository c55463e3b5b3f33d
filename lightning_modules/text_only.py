"""Text queries, text documents, one text embedder: the first stage of the reference recipe."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from lightning_modules.base import MatryoshkaEmbedder
from lightning_modules.components.matryoshka import matryoshka_slices, validate_matryoshka_dims
from lightning_modules.components.text_encoder import TextEncoder, TextEncoderConfig, pretrained_hidden_size


class TextOnly(MatryoshkaEmbedder):
    """Fine-tunes a Matryoshka text embedder (fully, or with LoRA) on text-query -> document pairs."""

    def __init__(
        self,
        text_encoder: TextEncoderConfig,
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
            text_encoder: The text model shared by queries and documents.
            matryoshka_dims: Sorted embedding sizes trained and evaluated (each a usable prefix).
            temperature: InfoNCE softmax temperature on cosine similarities.
            loss_weights: Optional weight per dim in the summed loss (missing dims weigh 1).
            optimizer: Optimizer factory called on the trainable parameters (default AdamW, lr 1e-4).
            lr_scheduler: Optional scheduler factory called on the optimizer, stepped every step.
            cross_device_negatives: Under DDP, every rank's documents are negatives for every
                query (global batch); false: each rank contrasts its own batch only.
            gradient_chunk_size: GradCache chunk (rows embedded at a time; same gradients, memory
                of one chunk); None: the whole batch in one pass.
            symmetric_loss: Also score each document against the batch's queries (CLIP-style
                InfoNCE, the mean of both directions per dim); false: queries -> documents only.
        """
        super().__init__(
            matryoshka_dims,
            temperature,
            loss_weights,
            optimizer,
            lr_scheduler,
            cross_device_negatives,
            gradient_chunk_size,
            symmetric_loss,
        )
        text_encoder = TextEncoderConfig.coerce(text_encoder)
        validate_matryoshka_dims(
            self.matryoshka_dims, max_dim=pretrained_hidden_size(text_encoder.pretrained_model_name_or_path)
        )
        self.text_encoder = TextEncoder(text_encoder)

    def embed_queries(self, batch: Mapping) -> dict[int, torch.Tensor]:
        return matryoshka_slices(self.text_encoder(**batch["query_text"]), self.matryoshka_dims)

    def embed_documents(self, batch: Mapping) -> dict[int, torch.Tensor]:
        return matryoshka_slices(self.text_encoder(**batch["document"]), self.matryoshka_dims)

    def export_text_encoder(self, directory: str | Path) -> None:
        """Writes the trained text model as a from_pretrained folder a later stage can name."""
        self.text_encoder.save_pretrained(directory)
