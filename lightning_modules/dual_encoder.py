"""Dual encoder: the speech tower alone embeds the spoken query; the frozen text tower embeds documents.

Query: waveform -> speech encoder (selected layers, frame mask) -> layer fusion -> LayerNorm ->
masked attention pooling -> one ``Linear`` head per Matryoshka dim (CLIP/CLAP style). Documents:
the frozen text Matryoshka embedder, sliced per dim. Two objectives:

- ``retrieval``: Matryoshka InfoNCE of the queries against their documents (in-batch negatives);
- ``alignment``: distil the frozen text tower's embedding of each query's transcription into the
  speech query (cosine + L1 per dim); best for transcription retrieval / keyword spotting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from errors import ConfigError
from lightning_modules.base import MatryoshkaEmbedder
from lightning_modules.components.adapters import LayerFusion, validate_fusion
from lightning_modules.components.matryoshka import (
    MatryoshkaHeads,
    matryoshka_slices,
    validate_matryoshka_dims,
)
from lightning_modules.components.pooling import AttentionPooling
from lightning_modules.components.speech_encoder import SpeechEncoder, SpeechEncoderConfig
from lightning_modules.components.text_encoder import (
    TextEncoder,
    TextEncoderConfig,
    pretrained_hidden_size,
    transcription_targets,
)
from lightning_modules.losses import matryoshka_alignment_loss

OBJECTIVES = ("retrieval", "alignment")


class DualEncoder(MatryoshkaEmbedder):
    """Speech tower + attention pooling + per-dim heads for queries; frozen text tower for documents."""

    def __init__(
        self,
        text_encoder: TextEncoderConfig,
        speech_encoder: SpeechEncoderConfig,
        objective: str = "retrieval",
        fusion: str = "weighted_sum",
        pooling_heads: int = 4,
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
            text_encoder: The frozen text Matryoshka embedder (e.g. the exported text-only stage).
            speech_encoder: The speech model; ``freeze: false`` trains it (its CNN waveform encoder
                stays frozen unless ``freeze_feature_encoder: false``).
            objective: ``retrieval`` (InfoNCE against documents) or ``alignment`` (distil the text
                tower's embedding of the transcription: cosine + L1 per dim).
            fusion: How the selected speech layers combine: ``weighted_sum`` (learned softmax
                weights) or ``concat``.
            pooling_heads: Attention heads of the pooling (must divide the fused width).
            matryoshka_dims: Sorted embedding sizes, one head each (each at most the text width).
            temperature: InfoNCE softmax temperature on cosine similarities (``retrieval``).
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
        if objective not in OBJECTIVES:
            raise ConfigError(f"model.objective={objective!r} is unknown; choose one of {list(OBJECTIVES)}.")
        if symmetric_loss and objective != "retrieval":
            raise ConfigError(
                f"model.symmetric_loss=true needs model.objective=retrieval (the {objective!r} objective "
                "has no InfoNCE); drop symmetric_loss or switch the objective."
            )
        validate_fusion(fusion, key="model.fusion")
        text_config = TextEncoderConfig.coerce(text_encoder)
        if text_config.lora is not None:
            raise ConfigError(
                "DualEncoder keeps its text tower frozen (documents and alignment targets); "
                "remove text_encoder.lora, or train the text tower first with TextOnly."
            )
        name = text_config.pretrained_model_name_or_path
        validate_matryoshka_dims(self.matryoshka_dims, max_dim=pretrained_hidden_size(name))
        self.objective = objective
        self.text_encoder = TextEncoder(text_config)
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

    @property
    def document_tower_frozen(self) -> bool:
        return True

    def document_tower(self) -> nn.Module:
        return self.text_encoder

    @property
    def contrasts_documents(self) -> bool:
        return self.objective == "retrieval"

    @property
    def needs_transcriptions(self) -> bool:
        return self.objective == "alignment"

    def loss_from_embeddings(self, batch, queries, documents) -> torch.Tensor:
        if self.objective == "retrieval":
            return super().loss_from_embeddings(batch, queries, documents)
        targets = transcription_targets(self.text_encoder, batch, self.matryoshka_dims)
        return matryoshka_alignment_loss(queries, targets, self.loss_weights)
