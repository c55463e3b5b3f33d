"""The loss over early exits (Matryoshka Layer Learning): any embedding loss, applied at every exit.

``NestedLayers(loss=MatryoshkaInfoNCE(...))`` splits the ``LossInputs`` of a model with
``matryoshka_layers`` into one per exit (``components/early_exit.py``: the ``(layer, dim)`` keys,
the full depth under the plain dims) and sums the inner loss's terms over them with a weight per
exit. The inner loss is unchanged (its dims, weights, cross-device negatives, hard negatives); the
model never re-declares its arguments. The two anchors differ in which exits train in a step:
ML-Embed every exit with equal weight (``sample: null``), sentence-transformers'
``AdaptiveLayerLoss`` the last layer plus sampled earlier ones (``sample: k``). Sampling saves
loss arithmetic only: every exit comes from the same forward pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from callbacks.exit_grid import exit_layers, exit_view
from errors import ConfigError
from lightning_modules.components.early_exit import validate_matryoshka_layers
from lightning_modules.losses import EmbeddingLoss, LossInputs, loss_from_config


class NestedLayers(EmbeddingLoss):
    """``sum_k w_k * loss(inputs at exit k)`` over the full depth and the model's early exits."""

    def __init__(
        self,
        loss: EmbeddingLoss,
        layer_weights: dict[int, float] | None = None,
        reduction: str = "sum",
        sample: int | None = None,
        seed: int = 0,
    ):
        """
        Args:
            loss: The loss applied at every exit (e.g. ``MatryoshkaInfoNCE``).
            layer_weights: Weight per exit, keyed by layer count (the full depth by its own, e.g. 28);
                missing exits weigh 1. A weight of 0 evaluates an exit without training it.
            reduction: 'sum' of the weighted exit losses, or 'mean' (divided by the sum of the
                weights used in the step).
            sample: None trains every exit every step (ML-Embed); k trains the full depth plus k
                earlier exits drawn uniformly per step (sentence-transformers' AdaptiveLayerLoss).
            seed: Seed of the draws; draw i uses seed + i on every rank, so DDP ranks agree.
        """
        super().__init__()
        if isinstance(loss, Mapping):
            loss = loss_from_config(loss)
        if reduction not in ("sum", "mean"):
            raise ConfigError(f"model.loss.reduction must be 'sum' or 'mean', got {reduction!r}.")
        if sample is not None and sample < 1:
            raise ConfigError(f"model.loss.sample must be >= 1 or null (every exit), got {sample}.")
        weights = {int(layer): float(weight) for layer, weight in (layer_weights or {}).items()}
        if any(weight < 0 for weight in weights.values()):
            raise ConfigError(f"model.loss.layer_weights must be >= 0, got {weights}.")
        self.loss = loss
        self.layer_weights = weights
        self.reduction = reduction
        self.sample = sample
        self.seed = seed
        self.needs = loss.needs
        self.depth: int | None = None
        # Draws made so far: in the checkpoint, so a resumed run draws what the full run would have.
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))
        self.init_args = {
            "loss": loss.config(),
            "layer_weights": weights,
            "reduction": reduction,
            "sample": sample,
            "seed": seed,
        }

    def min_rows(self) -> int:
        return self.loss.min_rows()

    def check_dims(self, dims: Sequence[int]) -> None:
        self.loss.check_dims(dims)

    def check_layers(self, exits: Sequence[int], depth: int) -> None:
        """Learns the model's depth; ConfigError when a weight names a layer that is no exit."""
        unknown = set(self.layer_weights) - {*exits, depth}
        if unknown:
            raise ConfigError(
                f"model.loss.layer_weights names layers {sorted(unknown)} that are not exits "
                f"(model.matryoshka_layers {list(exits)} and the full depth {depth})."
            )
        self.depth = depth

    def exits_this_step(self, exits: Sequence[int]) -> list[int | None]:
        """The exits trained now (None: the full depth), weight-0 ones left out."""
        chosen = list(exits)
        if self.sample is not None and self.sample < len(chosen):
            generator = torch.Generator().manual_seed(self.seed + int(self.draws))
            picks = torch.randperm(len(chosen), generator=generator)[: self.sample]
            chosen = [chosen[i] for i in sorted(picks.tolist())]
        if self.sample is not None:
            self.draws += 1
        return [layer for layer in [*chosen, None] if self.weight(layer) > 0]

    def weight(self, layer: int | None) -> float:
        return self.layer_weights.get(self.depth if layer is None else layer, 1.0)

    def terms(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        exits = self.exits_this_step(exit_layers(inputs.queries))
        total_weight = sum(self.weight(layer) for layer in exits)
        scale = 1.0 / total_weight if self.reduction == "mean" and total_weight > 0 else 1.0
        out: dict[str, torch.Tensor] = {}
        for layer in exits:
            at_exit = at_layer(inputs, layer)
            suffix = "" if layer is None else f"_L{layer}"
            for name, value in self.loss.terms(at_exit).items():
                out[f"{name}{suffix}"] = self.weight(layer) * scale * value
        if not out:  # every exit weighs 0: a zero that still reaches the parameters
            out["nested_layers"] = sum(value.sum() for value in inputs.queries.values()) * 0.0
        return out


def at_layer(inputs: LossInputs, layer: int | None) -> LossInputs:
    """The ``LossInputs`` at one exit (None: the full depth); sides without exits stay full depth."""
    views = {
        field.name: exit_view(value, layer) if isinstance(value, Mapping) else value
        for field in dataclasses.fields(inputs)
        for value in [getattr(inputs, field.name)]
    }
    return dataclasses.replace(inputs, **views)


def nested_layer_exits(loss: EmbeddingLoss, layers: Sequence[int] | None, depth: int) -> list[int]:
    """A model's early exits below ``depth`` (``model.matryoshka_layers`` checked), told to its loss."""
    exits = validate_matryoshka_layers(layers, depth)
    if isinstance(loss, NestedLayers):
        loss.check_layers(exits, depth)
    elif exits:
        raise ConfigError(
            f"model.matryoshka_layers={list(layers)} needs a loss over the exits, but model.loss is "
            f"{type(loss).__name__}: wrap it, loss: {{class_path: "
            "lightning_modules.nested_layers.NestedLayers, init_args: {loss: <the current loss>}}."
        )
    return exits
