"""Sequence pooling over masked hidden states (plain torch, no Lightning)."""

from __future__ import annotations

import torch
from torch import nn

from errors import ConfigError


def last_token_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of the last real token of each row, whatever the padding side.

    Decoder embedders (Qwen3-Embedding) read the final token, which has attended to the whole
    input. Taking ``[:, -1]`` only works for left padding; locating the last 1 of the mask works
    for both sides and for masks built by hand (speech frames appended after a prompt).
    """
    last = last_token_positions(attention_mask)
    return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last]


def last_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token ``[B]``: the position last-token pooling reads."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.to(torch.long) * positions).argmax(dim=1)


def mean_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the real tokens' hidden states (encoder models such as BERT/E5)."""
    weights = attention_mask.to(hidden_states.dtype).unsqueeze(-1)
    return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


POOLERS = {"last_token": last_token_pool, "mean": mean_pool}


class AttentionPooling(nn.Module):
    """Masked attention pooling with a learnable query: ``[B, T, H]`` frames -> ``[B, H]``.

    One learned query attends over the frames (multi-head, keys and values projected); padded
    frames get no weight, so a clip pools to the same vector alone or batched with longer ones.
    """

    def __init__(self, hidden_size: int, num_heads: int = 4):
        super().__init__()
        if hidden_size % num_heads:
            raise ConfigError(f"pooling: hidden size {hidden_size} is not divisible by {num_heads} heads.")
        self.query = nn.Parameter(torch.randn(1, 1, hidden_size) * hidden_size**-0.5)
        self.attention = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        query = self.query.to(frames.dtype).expand(frames.shape[0], -1, -1)
        pooled, _ = self.attention(
            query, frames, frames, key_padding_mask=~frame_mask.bool(), need_weights=False
        )
        return pooled[:, 0]
