"""Early exits of the text LLM (Matryoshka Layer Learning, ML-Embed): each listed depth embeds too.

Key scheme of an embedding dict with nested layers: the full-depth slices keep their dims as keys
(``{dim: [B, dim]}``, exactly as without nested layers), and every earlier exit adds its slices
under ``(layer, dim)``. Code that knows nothing of exits (other losses, caches, the embeddings
writer) reads the int keys and sees the full-depth model; ``NestedLayers``
(``lightning_modules/nested_layers.py``) and the evaluator read each exit through ``exit_view``
(in ``callbacks/exit_grid.py``, which the evaluator imports without Lightning).
A side without exit keys (late fusion's frozen documents) is full depth for every exit: a query
that exits early is scored against the same document index.

Every exit reads the hidden states of the one forward pass (a forward hook on its decoder layer),
passes them through the model's final norm (Qwen3 and Llama are pre-norm: only the last layer's
output is normed inside the model) and pools them as the last layer is pooled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from callbacks.exit_grid import ExitKey, with_exits
from errors import ConfigError
from lightning_modules.components.matryoshka import matryoshka_slices


def validate_matryoshka_layers(layers: Sequence[int] | None, depth: int) -> list[int]:
    """The exits below the full depth, ascending, or a ConfigError naming ``model.matryoshka_layers``.

    Listing the full depth itself is allowed (the anchor lists 28 of 28): it is always trained
    and evaluated, under the plain ``dim`` keys.
    """
    if layers is None:
        return []
    layers = list(layers)
    if any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in layers):
        raise ConfigError(f"model.matryoshka_layers must be positive layer counts, got {layers}.")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"model.matryoshka_layers has duplicates: {layers}; list each exit once.")
    if layers != sorted(layers):
        raise ConfigError(
            f"model.matryoshka_layers must be sorted ascending, got {layers}; use {sorted(layers)}."
        )
    if layers and layers[-1] > depth:
        raise ConfigError(
            f"model.matryoshka_layers {layers} has an exit at layer {layers[-1]}, deeper than the text "
            f"model's {depth} layers; the deepest exit is at most {depth}."
        )
    return [k for k in layers if k < depth]


def final_norm(decoder: nn.Module) -> nn.Module:
    """The decoder's final norm (``model.norm`` of Qwen/Llama/Mistral), which every exit applies."""
    norm = getattr(decoder, "norm", None)
    if not isinstance(norm, nn.Module) or not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        raise ConfigError(
            f"model.matryoshka_layers needs a pre-norm decoder with `layers` and a final `norm` "
            f"(Qwen3, Llama, Mistral); {type(decoder).__name__} has none. Remove matryoshka_layers."
        )
    return norm


@contextlib.contextmanager
def captured_layer_outputs(decoder: nn.Module, layers: Sequence[int]):
    """Inside: ``{layer: hidden states [B, T, H]}`` filled by the forward pass that runs (the output
    of decoder layer ``layer - 1``, before any norm)."""
    states: dict[int, torch.Tensor] = {}
    handles = []

    def keep(layer: int):
        def hook(module, args, output):
            states[layer] = output[0] if isinstance(output, tuple) else output

        return hook

    for layer in layers:
        handles.append(decoder.layers[layer - 1].register_forward_hook(keep(layer)))
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


def nested_slices(
    pooled: Mapping[int, torch.Tensor], depth: int, dims: Sequence[int]
) -> dict[ExitKey, torch.Tensor]:
    """Matryoshka slices of ``TextEncoder.forward_exits``'s output in the key scheme above."""
    exits = {layer: matryoshka_slices(value, dims) for layer, value in pooled.items() if layer != depth}
    return with_exits(matryoshka_slices(pooled[depth], dims), exits)
