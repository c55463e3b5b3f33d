"""An eval set's embeddings computed outside the Trainer's loop, exactly as evaluation computes them.

The datamodule's eval batches (``batches.eval_batch``: the same tokenization, prompts and audio
features as a validation batch) go through the model's evaluation path (``embed_queries``, or
``document_embeddings`` for the corpus), so an evaluation that embeds a set again (n-shot
classification, prompt x task) sees the embeddings validation scores. Called under
``torch.enable_grad()`` the query embeddings carry gradients (n-shot's contrastive stage).
A model with early exits is read at its full depth (``{dim: ...}``; the exits' ``(layer, dim)``
keys are left out).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from callbacks.exit_grid import exit_view
from datamodules.eval_sets import EvalSet


class EvalSetEmbedder:
    """``queries(eval_set, positions)`` / ``corpus(eval_set)`` -> ``{dim: [rows, dim]}`` in row order."""

    def __init__(self, module: torch.nn.Module, batches, batch_size: int = 64):
        """
        Args:
            module: A model with the embedding contract (``lightning_modules.base.MatryoshkaEmbedder``).
            batches: The datamodule's batch builder (``StreamingPairDataModule.batches``).
            batch_size: Rows per forward pass.
        """
        self.module, self.batches, self.batch_size = module, batches, batch_size

    def queries(self, eval_set: EvalSet, positions: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
        rows = eval_set.queries
        positions = range(len(rows)) if positions is None else positions
        return self._embed(eval_set.name, "queries", [(i, rows[i]) for i in positions])

    def corpus(self, eval_set: EvalSet) -> dict[int, torch.Tensor]:
        return self._embed(eval_set.name, "corpus", list(enumerate(eval_set.corpus)))

    def _embed(self, name: str, side: str, items: list[tuple[int, dict]]) -> dict[int, torch.Tensor]:
        if not items:
            raise ValueError(f"eval set {name!r}: no {side} to embed.")
        embed = self.module.document_embeddings if side == "corpus" else self.module.embed_queries
        parts = []
        for start in range(0, len(items), self.batch_size):
            batch = self.batches.eval_batch(items[start : start + self.batch_size], eval_set=name, side=side)
            parts.append(exit_view(embed(move_data_to_device(batch, self.module.device)), None))
        return {dim: torch.cat([part[dim] for part in parts]) for dim in parts[0]}
