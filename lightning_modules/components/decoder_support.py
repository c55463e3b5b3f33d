"""Which decoder LLMs the exact shortcuts (pooled final layer, cached prompt states) know.

Both shortcuts re-use pieces of transformers' decoder forward: the layer layout (pre-norm
attention with q/k/v/o projections, rotate-half RoPE, pre-norm MLP), the key/value cache and the
keyword names of transformers 5 (layers return a tensor). Anything else keeps the plain forward.
"""

from __future__ import annotations

import transformers
from packaging.version import Version
from torch import nn

# Decoder layers written as pre-norm attention (q/k/v/o projections, optional per-head q/k
# RMSNorm, rotate-half RoPE) + pre-norm MLP, with causal attention over every position.
SUPPORTED_MODEL_TYPES = frozenset({"qwen3", "qwen2", "llama", "mistral"})


def full_attention_decoder(model: nn.Module, final_layer_only: bool = False) -> bool:
    """Whether ``model`` (a bare transformers decoder, not PEFT-wrapped) is a supported causal LLM
    whose layers (or only its final one) attend to all earlier positions, on transformers >= 5."""
    if Version(transformers.__version__).major < 5:
        return False
    config = getattr(model, "config", None)
    if config is None or getattr(model, "layers", None) is None:
        return False
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return False
    if not getattr(config, "is_causal", True):
        return False  # a bidirectional variant: earlier positions would see later ones
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    if any(kind != "full_attention" for kind in (layer_types[-1:] if final_layer_only else layer_types)):
        return False  # a sliding window would need the window in the key masks
    return not getattr(config, "use_sliding_window", False) and not (
        config.model_type == "mistral" and getattr(config, "sliding_window", None)
    )


# RoPE variants whose frequencies depend on the sequence's length: a prompt encoded alone would
# be rotated differently from the same prompt inside a longer sequence.
LENGTH_DEPENDENT_ROPE = frozenset({"dynamic", "longrope"})


def rope_is_length_independent(config) -> bool:
    """Whether a position's rotary embedding is the same whatever the sequence's length."""
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    nested = parameters and all(isinstance(value, dict) for value in parameters.values())
    per_layer_type = list(parameters.values()) if nested else [parameters]  # {layer type: parameters}
    kinds = {entry.get("rope_type", entry.get("type", "default")) for entry in per_layer_type}
    return not kinds & LENGTH_DEPENDENT_ROPE
