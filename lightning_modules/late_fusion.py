"""Late fusion: speech frames fed into a frozen text Matryoshka embedder after a task prompt.

Query: waveform -> speech encoder (all layers, frame mask) -> layer fusion -> conv downsampler
-> projector -> ``[prompt token embeddings | speech tokens | end token]`` as ``inputs_embeds``
into the text LLM -> last-token pooling -> one slice per Matryoshka dim. Documents (and
transcriptions, for an alignment loss) go through the same text model as text. By default only
the downsampler and projector train.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch

from errors import ConfigError
from lightning_modules.base import MatryoshkaEmbedder
from lightning_modules.components.adapters import AdapterConfig, SpeechAdapter
from lightning_modules.components.matryoshka import matryoshka_slices
from lightning_modules.components.prompt_states import PromptStateCache
from lightning_modules.components.sequences import concat_masked_sequences
from lightning_modules.components.speech_encoder import SpeechEncoder, SpeechEncoderConfig
from lightning_modules.components.text_encoder import (
    TextEncoderConfig,
    special_token_affixes,
    text_tower,
    transcription_targets,
)


class LateFusion(MatryoshkaEmbedder):
    """Spoken queries through a small trainable adapter into a frozen text embedder (the paper's best)."""

    def __init__(
        self,
        text_encoder: TextEncoderConfig,
        speech_encoder: SpeechEncoderConfig,
        adapter: AdapterConfig | None = None,
        freeze_text_encoder: bool = True,
        adapt_documents: bool = True,
        cache_prompt_states: bool = True,
        **kwargs,
    ):
        """
        Args:
            text_encoder: The text Matryoshka embedder (e.g. the exported text-only stage); with
                ``lora`` set, its LoRA adapters train while the base weights stay frozen.
            speech_encoder: The speech model (HuBERT / wav2vec2 family) and the layers fed to the adapter.
            adapter: Layer fusion, downsampling convolution and projector (the trainable part).
            freeze_text_encoder: Keep the text model frozen (with LoRA the base is frozen anyway).
            adapt_documents: With LoRA, whether documents also go through the adapters. False:
                documents (and transcriptions) keep the text model's own embeddings, so a document
                index built with the text model stays valid and can be cached.
            cache_prompt_states: Run the frozen LLM over each task prompt once and reuse its keys
                and values (the same embeddings: ``components/prompt_states.py``). Applies while
                the text tower is frozen, without LoRA, on Qwen2/3, Llama or Mistral.
        """
        super().__init__(**kwargs)
        from transformers import AutoTokenizer

        self.text_encoder = text_tower(text_encoder, self.matryoshka_dims)
        lora = self.text_encoder.config.lora
        self.text_frozen = freeze_text_encoder and lora is None
        if not adapt_documents and not self.text_frozen and lora is None:
            # Documents would run on trainable weights, while a document cache served old ones.
            raise ConfigError(
                "model.adapt_documents=false keeps documents on the text model's own weights, which "
                "needs those weights frozen: with model.freeze_text_encoder=false and no LoRA they train. "
                "Set text_encoder.lora (documents then skip the adapters) or freeze_text_encoder=true."
            )
        self.adapt_documents = adapt_documents
        if self.text_frozen:
            self.freeze_tower("text_encoder")
        self.speech_encoder = SpeechEncoder(SpeechEncoderConfig.coerce(speech_encoder))
        self.adapter = SpeechAdapter(
            AdapterConfig.coerce(adapter),
            num_layers=self.speech_encoder.num_layers,
            speech_hidden=self.speech_encoder.hidden_size,
            llm_hidden=self.text_encoder.hidden_size,
            vocabulary_size=self.text_encoder.embedding_table().shape[0],
        )
        tokenizer = AutoTokenizer.from_pretrained(self.text_encoder.config.pretrained_model_name_or_path)
        opening, closing = special_token_affixes(tokenizer)
        self.register_buffer("opening_ids", torch.tensor(opening, dtype=torch.long), persistent=False)
        self.register_buffer("closing_ids", torch.tensor(closing, dtype=torch.long), persistent=False)
        self.prompt_state_cache = PromptStateCache() if cache_prompt_states else None
        self.train()

    def _fixed_tokens(self, ids: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = self.text_encoder.embed_tokens(ids)[None].expand(batch_size, -1, -1)
        return embeds, torch.ones(batch_size, ids.shape[0], dtype=torch.long, device=ids.device)

    def speech_tokens(self, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's output for the batch's audio: ``[B, S, llm_hidden]`` and its mask."""
        states = self.speech_encoder(**batch["query_audio"])
        return self.adapter(states.hidden_states, states.frame_mask, self.text_encoder.embedding_table())

    def setup(self, stage: str) -> None:
        # Each stage starts with fresh prompt states: a write to the LLM's weights through `.data`
        # (some loaders and EMA helpers) escapes the cache's fingerprint of in-place versions.
        if self.prompt_state_cache is not None:
            self.prompt_state_cache.clear()

    def _cached_prompt_states(self, prompt: Mapping):
        strategy = type(getattr(self._trainer, "strategy", None)).__name__
        # Sharded weights are gathered collectively in the LLM's forward: a rank meeting a new
        # prompt first would run one forward more than the others (a hang).
        if self.prompt_state_cache is None or strategy.startswith(("FSDP", "DeepSpeed", "ModelParallel")):
            return None
        return self.prompt_state_cache.states_for_batch(self.text_encoder, self.opening_ids, prompt)

    def embed_queries(self, batch: Mapping) -> dict[int, torch.Tensor]:
        speech, speech_mask = self.speech_tokens(batch)
        prompt, size = batch["prompt"], speech.shape[0]
        cached = self._cached_prompt_states(prompt)
        parts = []  # with cached prompt states the LLM starts after the prompt
        if cached is None:
            prompt_embeds = self.text_encoder.embed_tokens(prompt["input_ids"])
            parts = [self._fixed_tokens(self.opening_ids, size), (prompt_embeds, prompt["attention_mask"])]
        speech = speech.to(self.text_encoder.embedding_table().dtype)
        parts += [(speech, speech_mask), self._fixed_tokens(self.closing_ids, size)]
        inputs_embeds, attention_mask = concat_masked_sequences(parts)
        pooled = self.text_encoder(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, prompt_states=cached
        )
        return matryoshka_slices(pooled, self.matryoshka_dims)

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
