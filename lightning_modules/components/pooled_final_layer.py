"""The final decoder layer of a last-token-pooled embedder, run at the pooled token only.

Last-token pooling reads one position of the final layer's output. Every earlier layer must run
at every position (later tokens attend to them), but in the final layer only the pooled token's
query, attention output, MLP and norms reach the embedding; the other positions contribute their
keys and values and nothing else. Running the final layer at one position per row is the same
computation with the unused outputs left out (as ``logits_to_keep`` does for language-model
heads): on Qwen3-Embedding-0.6B (28 layers) it removes ~3 % of the model's FLOPs, on the demo's
2-layer model ~45 %.

The layer keeps its parameters and module path (checkpoints and ``save_pretrained`` are
unchanged); only its ``forward`` is replaced, and it falls back to the layer's own forward
whenever it is called outside ``TextEncoder.forward`` (e.g. a user calling the HF model). The
mask it reads is state on the layer, so one encoder must not run in two threads at once
(``nn.DataParallel`` replicas would share it; DDP, one process per device, does not).

Written against transformers 5 (decoder layers return a tensor, gradient checkpointing wraps
``forward``); older versions (layers returning tuples) keep the full layer. A Mistral with a
sliding window (its default) keeps it too.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.components.decoder_support import full_attention_decoder
from lightning_modules.components.pooling import last_token_positions


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [B, heads, T, head_dim]`` rotated by ``cos/sin [B, T, head_dim]``."""
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


def final_layer_is_prunable(model: nn.Module) -> bool:
    """Whether ``model`` (a bare transformers decoder, not PEFT-wrapped) has a supported final layer."""
    if not full_attention_decoder(model, final_layer_only=True):
        return False
    layer = model.layers[-1]
    attention = getattr(layer, "self_attn", None)
    needed = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx")
    return (
        attention is not None
        and all(hasattr(attention, name) for name in needed)
        and all(hasattr(layer, name) for name in ("input_layernorm", "post_attention_layernorm", "mlp"))
    )


class PooledFinalLayer:
    """Replaces a decoder layer's ``forward``; active only inside ``pooling_at(attention_mask)``."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.attention_mask: torch.Tensor | None = None
        layer.forward = self  # instance attribute: the module path and state_dict stay the same

    @contextlib.contextmanager
    def pooling_at(self, attention_mask: torch.Tensor):
        """Within this context the final layer computes only each row's last real token."""
        self.attention_mask = attention_mask
        try:
            yield
        finally:
            self.attention_mask = None

    def __call__(self, hidden_states: torch.Tensor, *args, position_embeddings=None, **kwargs):
        if self.attention_mask is None or position_embeddings is None:
            return type(self.layer).forward(
                self.layer, hidden_states, *args, position_embeddings=position_embeddings, **kwargs
            )
        # The key/value cache is `cache` in recent transformers 5 releases, `past_key_values` before.
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        return self._pooled_forward(hidden_states, position_embeddings, cache)

    def _pooled_forward(self, hidden_states: torch.Tensor, position_embeddings, cache) -> torch.Tensor:
        layer, attention = self.layer, self.layer.self_attn
        mask = self.attention_mask.to(torch.bool)  # [B, cached + T]: cached prompt states come first
        batch, length, _ = hidden_states.shape
        rows = torch.arange(batch, device=hidden_states.device)
        pooled = last_token_positions(mask) - (mask.shape[1] - length)  # the position the pooler reads

        normed = layer.input_layernorm(hidden_states)
        head_dim = attention.head_dim
        keys = attention.k_proj(normed).view(batch, length, -1, head_dim)
        values = attention.v_proj(normed).view(batch, length, -1, head_dim).transpose(1, 2)
        queries = attention.q_proj(normed[rows, pooled]).view(batch, 1, -1, head_dim)
        if hasattr(attention, "q_norm"):  # Qwen3: RMSNorm per head before RoPE
            queries, keys = attention.q_norm(queries), attention.k_norm(keys)
        cos, sin = (table.expand(batch, -1, -1) for table in position_embeddings)  # [1, T, d] if shared
        keys = _rope(keys.transpose(1, 2), cos, sin)
        queries = _rope(queries.transpose(1, 2), cos[rows, pooled][:, None], sin[rows, pooled][:, None])
        if cache is not None:  # the cached positions' keys and values, then these
            keys, values = cache.update(keys, values, attention.layer_idx)

        dropout = attention.attention_dropout if attention.training else 0.0
        attended = F.scaled_dot_product_attention(
            queries,
            keys.to(queries.dtype),
            values.to(queries.dtype),
            # The pooled token is its row's last real one: its causal mask is the padding mask.
            attn_mask=mask[:, None, None, :],
            dropout_p=dropout,
            scale=attention.scaling,
            enable_gqa=keys.shape[1] != queries.shape[1],
        )
        token = hidden_states[rows, pooled] + attention.o_proj(attended.reshape(batch, -1))
        token = token + layer.mlp(layer.post_attention_layernorm(token))
        # The other positions keep their input: only the pooled one is read after the final norm.
        return hidden_states.index_put((rows, pooled), token)
