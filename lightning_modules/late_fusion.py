"""Late fusion: speech frames fed into a frozen text Matryoshka embedder after a task prompt.

Query: waveform -> speech encoder (layers, frame mask) -> adapter (layer fusion, conv downsampler,
projector) -> ``[prompt | speech tokens | end token]`` as ``inputs_embeds`` into the text LLM ->
last-token pooling -> one slice per Matryoshka dim (``speech_into_llm.py``). Documents and
transcriptions go through the same text model as text. By default only the adapter trains.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lightning_modules.components.adapters import AdapterConfig, SpeechAdapter
from lightning_modules.components.speech_encoder import SpeechEncoderConfig
from lightning_modules.components.text_encoder import TextEncoderConfig
from lightning_modules.speech_into_llm import SpeechIntoLLM


class LateFusion(SpeechIntoLLM):
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
            adapt_documents: With LoRA, whether documents (and transcriptions) also go through the
                adapters. False: they keep the text model's own embeddings (cacheable, and a
                document index built with the text model stays valid).
            cache_prompt_states: Run the frozen LLM over each task prompt once and reuse its keys
                and values (same embeddings; frozen text tower without LoRA, Qwen2/3, Llama, Mistral).
        """
        super().__init__(
            text_encoder, speech_encoder, freeze_text_encoder, adapt_documents, cache_prompt_states, **kwargs
        )
        self.adapter = SpeechAdapter(
            AdapterConfig.coerce(adapter),
            num_layers=self.speech_encoder.num_layers,
            speech_hidden=self.speech_encoder.hidden_size,
            llm_hidden=self.text_encoder.hidden_size,
            vocabulary_size=self.text_encoder.embedding_table().shape[0],
        )
        self.train()

    def speech_tokens(self, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's output for the batch's audio: ``[B, S, llm_hidden]`` and its mask."""
        states = self.speech_encoder(**batch["query_audio"])
        return self.adapter(states.hidden_states, states.frame_mask, self.text_encoder.embedding_table())
