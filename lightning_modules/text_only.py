"""Text queries, text documents, one text embedder: the first stage of the reference recipe."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from lightning_modules.base import MatryoshkaEmbedder
from lightning_modules.components.matryoshka import matryoshka_slices
from lightning_modules.components.text_encoder import TextEncoderConfig, text_tower


class TextOnly(MatryoshkaEmbedder):
    """Fine-tunes a Matryoshka text embedder (fully, or with LoRA) on text-query -> document pairs."""

    def __init__(self, text_encoder: TextEncoderConfig, **kwargs):
        """
        Args:
            text_encoder: The text model shared by queries and documents.
        """
        super().__init__(**kwargs)
        self.text_encoder = text_tower(text_encoder, self.matryoshka_dims)

    def embed_queries(self, batch: Mapping) -> dict[int, torch.Tensor]:
        return matryoshka_slices(self.text_encoder(**batch["query_text"]), self.matryoshka_dims)

    def embed_documents(self, batch: Mapping) -> dict[int, torch.Tensor]:
        return matryoshka_slices(self.text_encoder(**batch["document"]), self.matryoshka_dims)

    def export_text_encoder(self, directory: str | Path) -> None:
        """Writes the trained text model as a from_pretrained folder a later stage can name."""
        self.text_encoder.save_pretrained(directory)
