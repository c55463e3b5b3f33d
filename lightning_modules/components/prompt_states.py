"""A frozen decoder's keys and values over each task prompt, computed once and reused.

A late-fusion query is ``[task prompt | speech tokens | end token]`` through a causal LLM. The
prompt comes first, so under causal attention its hidden states (and the keys and values every
layer derives from them) do not depend on the speech; with the LLM frozen they are the same at
every step. Computing them once per distinct prompt and handing them to the LLM as a key/value
cache (what generation does with a prefix) gives the same embedding while the LLM's forward and
backward run over the speech and end tokens only. With the default prompts (~14 tokens) and 25
speech tokens per second, that is 35 % of the LLM's tokens for a 1 s clip, 12 % at 4 s, 2 % at 30 s.

Exact up to float rounding: each row keeps its own positions (counting real tokens, as
``TextEncoder`` does), so its prompt is encoded exactly as inside the full sequence. Valid only
while the LLM's weights do not change and need no gradient. The states are keyed by the identity,
storage and in-place version of every weight and buffer, the device, the autocast state, the
attention implementation and train/eval mode; the owner also calls ``clear()`` at the start of
fit, validation and checkpoint loading (writes through ``.data`` escape the versions).
``states_for`` returns None (the caller runs the full sequence) when the text tower trains (LoRA,
unfrozen), checkpoints activations in train mode (transformers drops caches there), or is not a
supported decoder (``TextEncoder.supports_prompt_states``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lightning_modules.components.transformers_internals import attention_implementation


@dataclass
class PromptStates:
    """The batch's cached prompt states: per layer ``[B, kv_heads, P, head_dim]``, left-padded."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    """``[B, P]``: 1 at each row's real prompt tokens (right-aligned)."""

    def fresh_cache(self):
        """A transformers key/value cache holding these states (a forward appends to it, so one per call)."""
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=list(zip(self.keys, self.values, strict=True)))


def _autocast_state(device: torch.device) -> tuple:
    if not torch.is_autocast_enabled(device.type):
        return (False,)
    return (True, torch.get_autocast_dtype(device.type))


class PromptStateCache:
    """Per distinct prompt (its token ids), the frozen text tower's per-layer keys and values."""

    def __init__(self):
        self._states: dict[tuple[int, ...], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._fingerprint: tuple | None = None
        self.computed = 0
        """How many prompts were run through the LLM (each distinct prompt once while valid)."""

    def __getstate__(self):  # pickled with the module (ddp_spawn): tensors are cheap to recompute
        return {"_states": {}, "_fingerprint": None, "computed": self.computed}

    def clear(self) -> None:
        self._states, self._fingerprint = {}, None

    def _fingerprint_of(self, text_encoder, device: torch.device) -> tuple | None:
        """Identity of the weights the states were computed with; None when they may not be cached."""
        if not text_encoder.supports_prompt_states():
            return None
        tensors = []
        for parameter in text_encoder.parameters():
            if parameter.requires_grad:
                return None  # the prompt's states would need their gradient
            tensors.append(parameter)
        tensors.extend(text_encoder.buffers())  # e.g. RoPE frequencies
        identity = tuple((id(t), t.data_ptr(), t._version, t.dtype) for t in tensors)
        mode = (text_encoder.model.training, attention_implementation(text_encoder.model))
        return (device, _autocast_state(device), mode, identity)

    def states_for_batch(
        self, text_encoder, opening_ids: torch.Tensor, prompt: dict, sharded: bool = False
    ) -> PromptStates | None:
        """States of each row's ``opening tokens | prompt`` (a tokenized, padded prompt batch).

        None under sharded weights (FSDP, DeepSpeed): the LLM's forward gathers them collectively,
        and a rank meeting a new prompt first would run one forward more than the others (a hang).
        """
        if sharded:
            return None
        opening = opening_ids.tolist()
        rows = zip(prompt["input_ids"].tolist(), prompt["attention_mask"].tolist(), strict=True)
        prompts = [
            tuple(opening + [i for i, real in zip(ids, mask, strict=True) if real]) for ids, mask in rows
        ]
        return self.states_for(text_encoder, prompts, opening_ids.device)

    def states_for(self, text_encoder, prompts: list[tuple[int, ...]], device: torch.device):
        """``PromptStates`` for rows whose prompts are ``prompts`` (token ids), or None if not cacheable."""
        fingerprint = self._fingerprint_of(text_encoder, device)
        if fingerprint is None or not all(prompts):
            return None  # nothing to cache, or a row without a prompt (rare: run the full sequence)
        if fingerprint != self._fingerprint:
            self._states, self._fingerprint = {}, fingerprint
        distinct = list(dict.fromkeys(prompts))
        for prompt in distinct:
            if prompt not in self._states:
                # Normal tensors even when first met under Lightning's inference_mode (validation):
                # training reuses them.
                with torch.inference_mode(False):
                    ids = torch.tensor([prompt], dtype=torch.long, device=device)
                    self._states[prompt] = text_encoder.key_value_states(ids)
                self.computed += 1
        longest = max(len(prompt) for prompt in distinct)
        index = torch.tensor([distinct.index(prompt) for prompt in prompts], device=device)
        layers = len(self._states[distinct[0]][0])

        def batched(which: int, layer: int) -> torch.Tensor:
            padded = [
                F.pad(self._states[prompt][which][layer], (0, 0, longest - len(prompt), 0))
                for prompt in distinct
            ]  # [1, kv_heads, P, head_dim] each, left-padded to the longest
            return torch.cat(padded).index_select(0, index)

        mask = torch.tensor(
            [[0] * (longest - len(prompt)) + [1] * len(prompt) for prompt in prompts],
            dtype=torch.long,
            device=device,
        )
        return PromptStates(
            [batched(0, layer) for layer in range(layers)],
            [batched(1, layer) for layer in range(layers)],
            mask,
        )
