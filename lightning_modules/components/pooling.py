"""Sequence pooling over masked hidden states (plain torch, no Lightning)."""

from __future__ import annotations

import torch


def last_token_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of the last real token of each row, whatever the padding side.

    Decoder embedders (Qwen3-Embedding) read the final token, which has attended to the whole
    input. Taking ``[:, -1]`` only works for left padding; locating the last 1 of the mask works
    for both sides and for masks built by hand (speech frames appended after a prompt).
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.to(torch.long) * positions).argmax(dim=1)
    return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last]


def mean_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the real tokens' hidden states (encoder models such as BERT/E5)."""
    weights = attention_mask.to(hidden_states.dtype).unsqueeze(-1)
    return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


POOLERS = {"last_token": last_token_pool, "mean": mean_pool}
