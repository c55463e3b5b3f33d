"""Dual encoder: the speech tower alone embeds the spoken query; the frozen text tower embeds documents.

Query: waveform -> speech encoder (selected layers, frame mask) -> layer fusion -> LayerNorm ->
masked attention pooling -> one ``Linear`` head per Matryoshka dim (CLIP/CLAP style). Documents
and transcriptions: the frozen text Matryoshka embedder, sliced per dim. The loss chooses the
objective: ``MatryoshkaInfoNCE`` (retrieval) or ``TranscriptionAlignment`` (distil the text
tower's embedding of each query's transcription; best for transcription retrieval).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from errors import ConfigError
from lightning_modules.base import MatryoshkaEmbedder
from lightning_modules.components.adapters import LayerFusion, validate_fusion
from lightning_modules.components.matryoshka import MatryoshkaHeads, matryoshka_slices
from lightning_modules.components.pooling import AttentionPooling
from lightning_modules.components.speech_encoder import SpeechEncoder, SpeechEncoderConfig
from lightning_modules.components.text_encoder import TextEncoderConfig, text_tower, transcription_targets


class DualEncoder(MatryoshkaEmbedder):
    """Speech tower + attention pooling + per-dim heads for queries; frozen text tower for documents."""

    def __init__(
        self,
        text_encoder: TextEncoderConfig,
        speech_encoder: SpeechEncoderConfig,
        fusion: str = "weighted_sum",
        pooling_heads: int = 4,
        **kwargs,
    ):
        """
        Args:
            text_encoder: The frozen text Matryoshka embedder (e.g. the exported text-only stage).
            speech_encoder: The speech model; ``freeze: false`` trains it (its CNN waveform encoder
                stays frozen unless ``freeze_feature_encoder: false``).
            fusion: How the selected speech layers combine: ``weighted_sum`` (learned softmax
                weights) or ``concat``.
            pooling_heads: Attention heads of the pooling (must divide the fused width).
        """
        super().__init__(**kwargs)
        validate_fusion(fusion, key="model.fusion")
        if TextEncoderConfig.coerce(text_encoder).lora is not None:
            raise ConfigError(
                "DualEncoder keeps its text tower frozen (documents and alignment targets); "
                "remove text_encoder.lora, or train the text tower first with TextOnly."
            )
        self.text_encoder = text_tower(text_encoder, self.matryoshka_dims)
        self.freeze_tower("text_encoder")
        self.speech_encoder = SpeechEncoder(SpeechEncoderConfig.coerce(speech_encoder))
        self.fusion = LayerFusion(fusion, self.speech_encoder.num_layers, self.speech_encoder.hidden_size)
        # Speech layers differ in scale (early vs late); normalize what the pooling attends over.
        self.norm = nn.LayerNorm(self.fusion.output_size)
        self.pooling = AttentionPooling(self.fusion.output_size, pooling_heads)
        self.heads = MatryoshkaHeads(self.fusion.output_size, self.matryoshka_dims)
        self.train()

    def pooled_queries(self, batch: Mapping) -> torch.Tensor:
        """One vector per spoken query, ``[B, fused width]``, before the heads."""
        states = self.speech_encoder(**batch["query_audio"])
        layers = [layer.to(self.norm.weight.dtype) for layer in states.hidden_states]
        return self.pooling(self.norm(self.fusion(layers)), states.frame_mask)

    def embed_queries(self, batch: Mapping) -> dict[int, torch.Tensor]:
        return self.heads(self.pooled_queries(batch))

    def embed_documents(self, batch: Mapping) -> dict[int, torch.Tensor]:
        return matryoshka_slices(self.text_encoder(**batch["document"]), self.matryoshka_dims)

    def embed_transcriptions(self, batch: Mapping) -> dict[int, torch.Tensor]:
        return transcription_targets(self.text_encoder, batch, self.matryoshka_dims)

    @property
    def document_tower_frozen(self) -> bool:
        return True

    def document_tower(self) -> nn.Module:
        return self.text_encoder
