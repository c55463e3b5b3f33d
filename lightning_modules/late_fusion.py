"""Late fusion: speech frames fed into a frozen text Matryoshka embedder after a task prompt.

Query: waveform -> speech encoder (all layers, frame mask) -> layer fusion -> conv downsampler
-> projector -> ``[prompt token embeddings | speech tokens | end token]`` as ``inputs_embeds``
into the text LLM -> last-token pooling -> one slice per Matryoshka dim. Documents go through
the same text model as text. By default only the downsampler and projector train.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from errors import ConfigError
from lightning_modules.base import MatryoshkaEmbedder
from lightning_modules.components.adapters import AdapterConfig, SpeechAdapter
from lightning_modules.components.matryoshka import matryoshka_slices, validate_matryoshka_dims
from lightning_modules.components.prompt_states import PromptStateCache, PromptStates
from lightning_modules.components.sequences import concat_masked_sequences
from lightning_modules.components.speech_encoder import SpeechEncoder, SpeechEncoderConfig
from lightning_modules.components.text_encoder import (
    TextEncoder,
    TextEncoderConfig,
    pretrained_hidden_size,
    special_token_affixes,
    transcription_targets,
)
from lightning_modules.losses import matryoshka_alignment_loss


class LateFusion(MatryoshkaEmbedder):
    """Spoken queries through a small trainable adapter into a frozen text embedder (the paper's best)."""

    def __init__(
        self,
        text_encoder: TextEncoderConfig,
        speech_encoder: SpeechEncoderConfig,
        adapter: AdapterConfig | None = None,
        freeze_text_encoder: bool = True,
        adapt_documents: bool = True,
        alignment_weight: float = 0.0,
        matryoshka_dims: Sequence[int] = (128, 256, 512, 1024),
        temperature: float = 0.05,
        loss_weights: dict[int, float] | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        cross_device_negatives: bool = True,
        gradient_chunk_size: int | None = None,
        symmetric_loss: bool = False,
        cache_prompt_states: bool = True,
    ):
        """
        Args:
            text_encoder: The text Matryoshka embedder (e.g. the exported text-only stage); with
                ``lora`` set, its LoRA adapters train while the base weights stay frozen.
            speech_encoder: The speech model (HuBERT / wav2vec2 family) and the layers fed to the adapter.
            adapter: Layer fusion, downsampling convolution and projector (the trainable part).
            freeze_text_encoder: Keep the text model frozen (with LoRA the base is frozen anyway).
            adapt_documents: With LoRA, whether documents also go through the adapters. False:
                documents (and alignment targets) keep the text model's own embeddings (the
                base model in eval mode, as a frozen tower) while only speech queries are
                adapted, so a document index built with the text model stays valid and the
                frozen document embeddings can be cached.
            alignment_weight: Weight of an added alignment term (0: the paper's InfoNCE only): the
                speech query's embedding is pulled towards the same LLM's embedding of its
                transcription (cosine + L1 per dim, target without gradient). Needs the
                transcription of every training row.
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
            cache_prompt_states: Run the frozen LLM over each task prompt once and reuse its keys
                and values, so queries run it over the speech tokens only (the same embeddings:
                ``components/prompt_states.py``). Applies while the text tower is frozen and without
                LoRA, on Qwen2/3, Llama or Mistral (not sharded strategies); otherwise ignored.
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
        from transformers import AutoTokenizer

        if alignment_weight < 0:
            raise ConfigError(f"model.alignment_weight must be >= 0, got {alignment_weight}.")
        self.alignment_weight = alignment_weight

        text_config = TextEncoderConfig.coerce(text_encoder)
        name = text_config.pretrained_model_name_or_path
        validate_matryoshka_dims(self.matryoshka_dims, max_dim=pretrained_hidden_size(name))
        self.text_encoder = TextEncoder(text_config)
        self.text_frozen = freeze_text_encoder and text_config.lora is None
        if not adapt_documents and not self.text_frozen and text_config.lora is None:
            # Documents would still run on the trainable weights, while the frozen-document cache
            # (which trusts adapt_documents) served the starting weights' embeddings.
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
        opening, closing = special_token_affixes(AutoTokenizer.from_pretrained(name))
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

    # The cached prompt states start afresh at each stage: a write to the LLM's weights through
    # `.data` (some loaders and EMA helpers) escapes the fingerprint's in-place versions.
    def _clear_prompt_states(self) -> None:
        if self.prompt_state_cache is not None:
            self.prompt_state_cache.clear()

    def on_fit_start(self) -> None:
        self._clear_prompt_states()

    def on_validation_start(self) -> None:
        self._clear_prompt_states()

    def on_test_start(self) -> None:
        self._clear_prompt_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._clear_prompt_states()

    def _cached_prompt_states(self, prompt: Mapping) -> PromptStates | None:
        """Each row's ``opening tokens | prompt`` states from the cache (None: run them in full)."""
        if self.prompt_state_cache is None:
            return None
        strategy = type(getattr(self._trainer, "strategy", None)).__name__
        if strategy.startswith(("FSDP", "DeepSpeed", "ModelParallel")):
            # Sharded weights: the LLM's forward gathers them collectively, and a rank meeting a
            # new prompt first would run one forward more than the others (a hang).
            return None
        opening = self.opening_ids.tolist()
        prompts = [
            tuple(opening + [i for i, real in zip(ids, mask, strict=True) if real])
            for ids, mask in zip(prompt["input_ids"].tolist(), prompt["attention_mask"].tolist(), strict=True)
        ]
        return self.prompt_state_cache.states_for(self.text_encoder, prompts, self.opening_ids.device)

    def embed_queries(self, batch: Mapping) -> dict[int, torch.Tensor]:
        speech, speech_mask = self.speech_tokens(batch)
        prompt = batch["prompt"]
        size = speech.shape[0]
        cached = self._cached_prompt_states(prompt)
        # With cached prompt states the LLM starts after the prompt; otherwise it runs it too.
        parts = []
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
        """Documents (and alignment targets) skip the LoRA adapters unless ``adapt_documents``."""
        return contextlib.nullcontext() if self.adapt_documents else self.text_encoder.base_model_only()

    @property
    def document_tower_frozen(self) -> bool:
        return self.text_frozen or not self.adapt_documents

    def document_tower(self) -> torch.nn.Module:
        return self.text_encoder

    def embed_documents(self, batch: Mapping) -> dict[int, torch.Tensor]:
        with self._document_path():
            return matryoshka_slices(self.text_encoder(**batch["document"]), self.matryoshka_dims)

    @property
    def needs_transcriptions(self) -> bool:
        return self.alignment_weight > 0

    def loss_from_embeddings(self, batch, queries, documents) -> torch.Tensor:
        loss = self.contrastive_loss(batch, queries, documents)
        if self.alignment_weight == 0:
            return loss
        # Why: the text path already embeds the transcription where the speech path must land;
        # distilling it gives every query a dense target on top of the in-batch contrast.
        with self._document_path():
            targets = transcription_targets(self.text_encoder, batch, self.matryoshka_dims)
        alignment = matryoshka_alignment_loss(queries, targets, self.loss_weights)
        self.log("train/alignment_loss", alignment, batch_size=len(batch["ids"]))
        return loss + self.alignment_weight * alignment
