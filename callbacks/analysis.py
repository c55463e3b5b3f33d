"""Analyses of an eval set's embeddings: plugged into ``callbacks.evaluation.Evaluator``.

Every eval set is encoded once per validation (queries and corpus, every Matryoshka dim from one
pass); the evaluator scores it and then hands the same embeddings to each analysis, so adding an
analysis never adds an encoding pass. An analysis is plain code (no Lightning): under DDP the
callback runs it on rank 0 and broadcasts its numbers like the retrieval metrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from datamodules.eval_sets import EvalSet

# {"queries": {dim: [n_queries, dim]}, "corpus": {dim: [n_documents, dim]}}
Embeddings = dict[str, dict[int, torch.Tensor]]


class EmbeddingAnalysis:
    """Base of an analysis: numbers per eval set (and optionally a figure) from its embeddings."""

    def analyze(self, eval_set: EvalSet, embeddings: Embeddings) -> dict[str, float]:
        """Scalars keyed ``<metric>/d<dim>`` (one chart per metric, one curve per dim) or ``<metric>``;
        the evaluator prefixes ``<stage>/<eval set>/``."""
        raise NotImplementedError

    def figures(self, eval_set: EvalSet) -> dict:
        """Matplotlib figures of the last ``analyze`` call, keyed by a short name."""
        return {}

    def metric_names(self, dims: list[int]) -> set[str] | None:
        """Every key ``analyze`` can return for these dims, so that a checkpoint monitor naming
        one is checked when fit starts; None (the default): not declared, such monitors are
        taken on trust."""
        return None
