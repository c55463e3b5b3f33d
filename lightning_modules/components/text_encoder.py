"""Text embedder over any ``transformers.AutoModel`` (plain nn.Module, no Lightning).

One wrapper serves decoder embedders (Qwen3-Embedding: last-token pooling) and encoder
embedders (BERT/E5: mean pooling), from token ids or from ready ``inputs_embeds`` (the path late
fusion uses to splice speech frames between text tokens).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from errors import ConfigError
from lightning_modules.components.decoder_support import full_attention_decoder, rope_is_length_independent
from lightning_modules.components.early_exit import captured_layer_outputs, final_norm
from lightning_modules.components.factorised_embedding import (
    EmbeddingRanks,
    FactorisedEmbedding,
    rank_savings,
)
from lightning_modules.components.matryoshka import matryoshka_slices, validate_matryoshka_dims
from lightning_modules.components.pooled_final_layer import PooledFinalLayer, final_layer_is_prunable
from lightning_modules.components.pooling import POOLERS
from lightning_modules.components.prompt_states import PromptStates

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraSettings:
    """PEFT LoRA on the text model; only the adapter weights train and are checkpointed."""

    r: int = 16
    """Rank of the low-rank update."""
    alpha: int = 32
    """LoRA scaling numerator (update scale is alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA branch input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Names of the Linear layers that get adapters (Qwen/Llama attention projections by default)."""


@dataclass
class TextEncoderConfig:
    """Which pretrained text model to load and how it embeds."""

    pretrained_model_name_or_path: str
    """Hub name or local folder (e.g. Qwen/Qwen3-Embedding-0.6B, or an exported text-only stage)."""
    pooling: str = "last_token"
    """'last_token' for decoder embedders (Qwen3-Embedding), 'mean' for encoder models."""
    dtype: str | None = None
    """Weights dtype at load time: float32, bfloat16 or float16 (None: float32)."""
    attn_implementation: str | None = None
    """Passed to from_pretrained (e.g. 'sdpa', 'flash_attention_2'); None lets transformers pick."""
    lora: LoraSettings | None = None
    """Train LoRA adapters instead of the full model when set."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory on long documents."""
    pooled_final_layer: bool = True
    """With last-token pooling, run the final decoder layer at the pooled token only (the same
    embedding, fewer FLOPs: see ``components/pooled_final_layer.py``); Qwen2/3, Llama, Mistral."""
    embedding_ranks: EmbeddingRanks | None = None
    """Factorise the token table (SVD-initialised) and train it at nested ranks (ML-Embed's
    Matryoshka Embedding Learning; ``components/factorised_embedding.py``). Full fine-tune only."""

    @classmethod
    def coerce(cls, value: TextEncoderConfig | dict) -> TextEncoderConfig:
        """Accepts the dict form too: saved hyperparameters hold dataclasses as dicts."""
        if isinstance(value, cls):
            return value
        fields = dict(value)
        if isinstance(fields.get("lora"), dict):
            fields["lora"] = LoraSettings(**fields["lora"])
        fields["embedding_ranks"] = EmbeddingRanks.coerce(fields.get("embedding_ranks"))
        return cls(**fields)

    def __post_init__(self):
        self.embedding_ranks = EmbeddingRanks.coerce(self.embedding_ranks)
        if self.pooling not in POOLERS:
            raise ConfigError(
                f"text_encoder.pooling={self.pooling!r} is unknown; choose one of {sorted(POOLERS)}."
            )
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(
                f"text_encoder.dtype={self.dtype!r} is unknown; choose one of {sorted(DTYPES)}."
            )


def pretrained_hidden_size(name_or_path: str) -> int:
    """Hidden size from the model config alone, so bad dims fail before the weights load."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name_or_path).hidden_size


def special_token_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text (e.g. Qwen3-Embedding: none, <|endoftext|>).

    Late fusion builds its inputs by hand, so it adds them itself around prompt + speech; an
    embedder that pools the last token must end every input exactly as it was trained to.
    """
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), None)
    if start is None:
        raise ConfigError("cannot locate the text inside the tokenizer's special-token template.")
    prefix, suffix = full[:start], full[start + len(plain) :]
    if not suffix and tokenizer.eos_token_id is not None:
        suffix = [tokenizer.eos_token_id]
    return prefix, suffix


def checkpointing_activations(model: nn.Module) -> bool:
    """Whether a ``transformers`` model recomputes its layers' activations in backward."""
    # transformers 5 renamed `is_gradient_checkpointing` (deprecated) to `is_activation_checkpointing`.
    renamed = hasattr(type(model), "is_activation_checkpointing")
    return bool(
        getattr(model, "is_activation_checkpointing" if renamed else "is_gradient_checkpointing", False)
    )


class TextEncoder(nn.Module):
    """Pooled, un-normalized text embeddings ``[B, hidden]`` (slicing and normalization come after)."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        from transformers import AutoModel

        self.config = config
        kwargs = {}
        if config.dtype is not None:
            kwargs["dtype"] = DTYPES[config.dtype]
        if config.attn_implementation is not None:
            kwargs["attn_implementation"] = config.attn_implementation
        model = AutoModel.from_pretrained(config.pretrained_model_name_or_path, **kwargs)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.nested_ranks: list[int] = []
        if config.embedding_ranks is not None:
            if config.lora is not None:
                raise ConfigError(
                    "model.text_encoder.embedding_ranks trains the token table, which LoRA freezes: "
                    "remove text_encoder.lora or text_encoder.embedding_ranks."
                )
            self.nested_ranks = config.embedding_ranks.check(model.config.hidden_size)
            table = model.get_input_embeddings()
            model.set_input_embeddings(
                FactorisedEmbedding(table.weight, config.embedding_ranks.rank, table.padding_idx)
            )
            log.info("%s", rank_savings(*table.weight.shape, self.nested_ranks))
        if config.lora is not None:
            from peft import LoraConfig, get_peft_model

            lora = config.lora
            model = get_peft_model(
                model,
                LoraConfig(
                    r=lora.r,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    target_modules=lora.target_modules,
                ),
            )
        # from_pretrained returns eval mode; the owner decides (frozen towers call .eval() again).
        self.model = model.train()
        self.pool = POOLERS[config.pooling]
        decoder = model.get_base_model() if config.lora is not None else model
        self._prompt_states_supported = full_attention_decoder(decoder) and rope_is_length_independent(
            decoder.config
        )
        # The key/value cache is `cache` in recent transformers 5 releases, `past_key_values` before.
        self._cache_argument = (
            "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        )
        self.pooled_final_layer = None
        if config.pooled_final_layer and config.pooling == "last_token" and final_layer_is_prunable(decoder):
            self.pooled_final_layer = PooledFinalLayer(decoder.layers[-1])

    def special_affixes(self) -> tuple[list[int], list[int]]:
        """The special token ids the model's tokenizer puts before and after a text."""
        from transformers import AutoTokenizer

        return special_token_affixes(AutoTokenizer.from_pretrained(self.config.pretrained_model_name_or_path))

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @contextlib.contextmanager
    def base_model_only(self):
        """Context running the base model as a frozen tower runs: LoRA adapters off and eval mode
        (no dropout; the mode comes back after), so its embeddings are the same at every call and
        match a cache of them. A no-op without LoRA."""
        if self.config.lora is None:
            yield
            return
        training = self.model.training
        with self.model.disable_adapter():
            self.model.eval()
            try:
                yield
            finally:
                self.model.train(training)

    def embedding_table(self) -> torch.Tensor:
        """The input embedding weight ``[vocabulary, hidden]`` (the LLM's own tensor, not a copy)."""
        return self.model.get_input_embeddings().weight

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input token embeddings, for callers that build ``inputs_embeds`` themselves."""
        return self.model.get_input_embeddings()(input_ids)

    def supports_prompt_states(self) -> bool:
        """Whether ``forward`` can start from cached prompt states (``components/prompt_states.py``):
        a supported causal decoder with position-independent RoPE, last-token pooled, without
        LoRA, and not checkpointing activations (transformers drops caches there in train mode)."""
        return (
            self._prompt_states_supported
            and self.config.pooling == "last_token"
            and self.config.lora is None
            and not (self.model.training and checkpointing_activations(self.model))
        )

    @torch.no_grad()
    def key_value_states(self, input_ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every layer's keys and values over ``input_ids [1, P]`` (a prompt alone, positions 0..P-1)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        self.model(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            position_ids=torch.arange(input_ids.shape[1], device=input_ids.device)[None],
            use_cache=True,
            **{self._cache_argument: cache},
        )
        return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]

    @property
    def num_layers(self) -> int:
        """The depth of the text model (its decoder layers)."""
        return self.model.config.num_hidden_layers

    def decoder(self) -> nn.Module:
        """The bare transformers model (under PEFT's wrapper when LoRA is on)."""
        return self.model.get_base_model() if self.config.lora is not None else self.model

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        prompt_states: PromptStates | None = None,
    ) -> torch.Tensor:
        """Pooled embeddings ``[B, hidden]``; with ``prompt_states``, of ``prompt | these tokens``
        (the cached prompt's keys and values stand in for running the LLM over it)."""
        return self.forward_exits((), input_ids, attention_mask, inputs_embeds, prompt_states)[
            self.num_layers
        ]

    def forward_exits(
        self,
        exits: Sequence[int],
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        prompt_states: PromptStates | None = None,
    ) -> dict[int, torch.Tensor]:
        """``{layer: pooled [B, hidden]}`` at every exit in ``exits`` (layer counts below the depth)
        and at the full depth, from one forward pass: each exit's hidden states go through the
        model's final norm, then the same pooling (``components/early_exit.py``)."""
        if attention_mask is None:
            raise ValueError("TextEncoder needs an attention_mask to pool over real tokens only.")
        kwargs = {}
        full_mask = attention_mask
        if prompt_states is not None:
            if not bool(attention_mask.any(dim=1).all()):
                raise ValueError("after cached prompt states every row needs a real token to pool.")
            full_mask = torch.cat([prompt_states.mask.to(attention_mask.dtype), attention_mask], dim=1)
            kwargs[self._cache_argument] = prompt_states.fresh_cache()
        if self.config.pooling == "last_token":
            # Positions count real tokens only, so a left-padded row is encoded exactly as if it
            # were alone (the default positions would shift it by its padding length).
            positions = (full_mask.long().cumsum(dim=1) - 1).clamp(min=0)
            kwargs["position_ids"] = positions[:, full_mask.shape[1] - attention_mask.shape[1] :]
            kwargs["use_cache"] = False  # an embedder generates nothing: no key/value cache to keep
        pruning = (
            self.pooled_final_layer.pooling_at(full_mask)
            if self.pooled_final_layer is not None
            else contextlib.nullcontext()
        )
        decoder = self.decoder() if exits else None
        capture = captured_layer_outputs(decoder, exits) if exits else contextlib.nullcontext({})
        with pruning, capture as states:
            output = self.model(
                input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=full_mask, **kwargs
            )
        pooled = {layer: self.pool(final_norm(decoder)(states[layer]), attention_mask) for layer in exits}
        pooled[self.num_layers] = self.pool(output.last_hidden_state, attention_mask)
        return pooled

    def set_embedding_rank(self, rank: int) -> None:
        """The nested rank the factorised token table embeds with from now on."""
        if rank not in self.nested_ranks and rank != self.config.embedding_ranks.eval_rank:
            raise ConfigError(f"embedding rank {rank} is not one of the trained ranks {self.nested_ranks}.")
        self.model.get_input_embeddings().rank = rank

    def save_pretrained(
        self, directory: str | Path, num_layers: int | None = None, rank: int | None = None
    ) -> None:
        """A ``from_pretrained`` folder with its tokenizer (LoRA merged in; adapter also in PEFT format).

        ``num_layers``: export the early exit at that depth: the first ``num_layers`` decoder
        layers and the final norm (``config.num_hidden_layers`` says so), a model whose last-token
        embedding is the exit's; the dropped layers' weights are not in the folder.
        ``rank`` (with ``embedding_ranks``): the token table at that rank, dense in the folder (any
        ``from_pretrained`` loads it) and as its two factors in ``embedding_factors.safetensors``,
        which ``load_factorised`` swaps in for the dense table: the parameter saving.
        """
        from transformers import AutoTokenizer

        directory = Path(directory)
        AutoTokenizer.from_pretrained(self.config.pretrained_model_name_or_path).save_pretrained(directory)
        model = self.model
        if self.config.lora is not None:
            model.save_pretrained(directory / "lora_adapter")
            model = copy.deepcopy(model).merge_and_unload()
        if num_layers is not None and num_layers != self.num_layers:
            model = truncated_decoder(model, num_layers)
        table = model.get_input_embeddings()
        if isinstance(table, FactorisedEmbedding):
            rank = table.rank if rank is None else rank
            if model is self.model:
                model = copy.deepcopy(model)
            model.set_input_embeddings(table.dense(rank))
            from safetensors.torch import save_file

            save_file(table.factors(rank), str(directory / FACTORS_FILE))
        elif rank is not None:
            raise ConfigError("an export at an embedding rank needs text_encoder.embedding_ranks.")
        model.save_pretrained(directory)


FACTORS_FILE = "embedding_factors.safetensors"


def load_factorised(directory: str | Path, **kwargs) -> nn.Module:
    """``AutoModel.from_pretrained(directory)`` with its token table replaced by the factors saved
    beside it (``V*k + k*H`` parameters instead of ``V*H``; the same embeddings)."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    model = AutoModel.from_pretrained(directory, **kwargs)
    dense = model.get_input_embeddings()
    factors = load_file(str(Path(directory) / FACTORS_FILE))
    model.set_input_embeddings(FactorisedEmbedding.from_factors(factors, dense.padding_idx))
    return model


def truncated_decoder(model: nn.Module, num_layers: int) -> nn.Module:
    """A copy of a transformers decoder with its first ``num_layers`` layers (and its final norm)."""
    depth = model.config.num_hidden_layers
    if not 1 <= num_layers <= depth:
        raise ConfigError(f"an exit at layer {num_layers} does not exist in a {depth}-layer model.")
    layers = model.layers
    model.layers = nn.ModuleList()  # not deep-copied: only the kept layers are
    try:
        truncated = copy.deepcopy(model)
    finally:
        model.layers = layers
    truncated.layers = copy.deepcopy(layers[:num_layers])
    truncated.config.num_hidden_layers = num_layers
    if getattr(truncated.config, "layer_types", None) is not None:
        truncated.config.layer_types = truncated.config.layer_types[:num_layers]
    return truncated


def transcription_targets(text_encoder: TextEncoder, batch, dims) -> dict[int, torch.Tensor]:
    """The text tower's embedding of each query's transcription, sliced per dim, without gradient.

    The alignment targets of speech queries (dual encoders, late fusion's alignment term).
    """
    if batch.get("query_text") is None:
        raise ConfigError(
            "an alignment loss needs the transcription of every training query (the data's "
            "query text column); this batch has rows without one."
        )
    with torch.no_grad():
        return matryoshka_slices(text_encoder(**batch["query_text"]), dims)


def text_tower(config: TextEncoderConfig | dict, dims) -> TextEncoder:
    """The text encoder ``config`` names, once the Matryoshka dims are checked against its width
    (from its config file, before any weight is loaded)."""
    config = TextEncoderConfig.coerce(config)
    validate_matryoshka_dims(dims, max_dim=pretrained_hidden_size(config.pretrained_model_name_or_path))
    return TextEncoder(config)
