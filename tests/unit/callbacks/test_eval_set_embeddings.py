"""EvalSetEmbedder: rows in order, in batches, a model with early exits read at its full depth."""

from __future__ import annotations

import torch

from callbacks.eval_set_embeddings import EvalSetEmbedder
from datamodules.eval_sets import EvalSet


class _Batches:
    def eval_batch(self, items, eval_set, side):
        return {"index": torch.tensor([position for position, _ in items]), "side": side}


class _ExitingModel(torch.nn.Module):
    """Embeds row i as [i, i] at full depth and [-i, -i] at its exit 1 (keys as TextOnly's)."""

    device = torch.device("cpu")

    def embed_queries(self, batch):
        rows = batch["index"].float()[:, None].expand(-1, 2)
        return {2: rows, (1, 2): -rows}

    document_embeddings = embed_queries


def test_rows_in_order_across_batches_and_the_full_depth_only():
    eval_set = EvalSet("toy", queries=[{"id": str(i)} for i in range(5)], corpus=[{"id": "d", "text": "x"}])
    embedder = EvalSetEmbedder(_ExitingModel(), _Batches(), batch_size=2)
    queries = embedder.queries(eval_set)
    assert list(queries) == [2]  # the exit's (1, 2) key is left out
    assert queries[2][:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert embedder.queries(eval_set, [4, 1])[2][:, 0].tolist() == [4.0, 1.0]
