"""Spoken queries as tokens of a text LLM: the part late fusion and unit fusion share.

Query: waveform -> speech encoder (layers, frame mask) -> ``speech_tokens`` (each design's own:
an adapter's vectors, or discrete units' embeddings) -> ``[prompt | speech tokens | end token]``
as ``inputs_embeds`` into the text LLM -> last-token pooling -> one slice per Matryoshka dim.
Documents and transcriptions go through the same text model as text (through its LoRA adapters
or, with ``adapt_documents: false``, its own frozen weights).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch

from errors import ConfigError
from lightning_modules.base import MatryoshkaEmbedder
from lightning_modules.components.early_exit import nested_slices
from lightning_modules.components.matryoshka import matryoshka_slices
from lightning_modules.components.prompt_states import PromptStateCache
from lightning_modules.components.sequences import speech_after_prompt
from lightning_modules.components.speech_encoder import SpeechEncoder, SpeechEncoderConfig
from lightning_modules.components.text_encoder import TextEncoderConfig, text_tower, transcription_targets
from lightning_modules.nested_layers import nested_layer_exits


class SpeechIntoLLM(MatryoshkaEmbedder):
    """The text LLM, the speech tower, prompts and documents; subclasses say what ``speech_tokens`` are."""

    def __init__(
        self,
        text_encoder: TextEncoderConfig,
        speech_encoder: SpeechEncoderConfig,
        freeze_text_encoder: bool = True,
        adapt_documents: bool = True,
        cache_prompt_states: bool = True,
        matryoshka_layers: list[int] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.text_encoder = text_tower(text_encoder, self.matryoshka_dims)
        # Early exits on the query path (documents stay at full depth: one index for every exit).
        self.exits = nested_layer_exits(self.loss, matryoshka_layers, self.text_encoder.num_layers)
        lora = self.text_encoder.config.lora
        self.text_frozen = freeze_text_encoder and lora is None
        if not adapt_documents and not self.text_frozen and lora is None:  # no frozen weights to keep
            raise ConfigError(
                "model.adapt_documents=false keeps documents on the text model's own weights, which "
                "train with freeze_text_encoder=false and no LoRA: set text_encoder.lora or "
                "freeze_text_encoder=true."
            )
        self.adapt_documents = adapt_documents
        if self.text_frozen:
            self.freeze_tower("text_encoder")
        self.speech_encoder = SpeechEncoder(SpeechEncoderConfig.coerce(speech_encoder))
        opening, closing = self.text_encoder.special_affixes()
        self.register_buffer("opening_ids", torch.tensor(opening, dtype=torch.long), persistent=False)
        self.register_buffer("closing_ids", torch.tensor(closing, dtype=torch.long), persistent=False)
        self.prompt_state_cache = PromptStateCache() if cache_prompt_states else None

    def speech_tokens(self, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's audio as LLM input vectors: ``[B, S, llm_hidden]`` and their mask."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        # Each stage starts with fresh prompt states: a write to the LLM's weights through `.data`
        # (some loaders and EMA helpers) escapes the cache's fingerprint of in-place versions.
        if self.prompt_state_cache is not None:
            self.prompt_state_cache.clear()

    def embed_queries(self, batch: Mapping) -> dict[int, torch.Tensor]:
        speech, speech_mask = self.speech_tokens(batch)
        cached = self._prompt_states(batch["prompt"])
        inputs_embeds, attention_mask = speech_after_prompt(
            self.text_encoder.embed_tokens,
            speech.to(self.text_encoder.embedding_table().dtype),
            speech_mask,
            batch["prompt"],
            self.opening_ids,
            self.closing_ids,
            prompt_cached=cached is not None,
        )
        pooled = self.text_encoder.forward_exits(
            self.exits, inputs_embeds=inputs_embeds, attention_mask=attention_mask, prompt_states=cached
        )
        return nested_slices(pooled, self.text_encoder.num_layers, self.matryoshka_dims)

    @property
    def matryoshka_layers(self) -> list[int]:
        """Every depth the query path embeds at: the early exits, then the full depth."""
        return [*self.exits, self.text_encoder.num_layers]

    def _prompt_states(self, prompt: Mapping):
        if self.prompt_state_cache is None:
            return None
        strategy = type(getattr(self._trainer, "strategy", None)).__name__
        sharded = strategy.startswith(("FSDP", "DeepSpeed", "ModelParallel"))
        return self.prompt_state_cache.states_for_batch(self.text_encoder, self.opening_ids, prompt, sharded)

    def _document_path(self):
        """Documents and transcriptions skip the LoRA adapters unless ``adapt_documents``."""
        return contextlib.nullcontext() if self.adapt_documents else self.text_encoder.base_model_only()

    def embed_documents(self, batch: Mapping) -> dict[int, torch.Tensor]:
        with self._document_path():
            return matryoshka_slices(self.text_encoder(**batch["document"]), self.matryoshka_dims)

    def embed_transcriptions(self, batch: Mapping) -> dict[int, torch.Tensor]:
        with self._document_path():
            return transcription_targets(self.text_encoder, batch, self.matryoshka_dims)

    @property
    def document_tower_frozen(self) -> bool:
        return self.text_frozen or not self.adapt_documents

    def document_tower(self) -> torch.nn.Module:
        return self.text_encoder
