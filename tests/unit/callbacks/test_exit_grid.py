"""The (exit x dim) grid: every exit scored from its own embeddings, tags, table, cheapest cell, figure."""

from __future__ import annotations

import pytest
import torch
from test_metrics import _pytrec_reference, _random_qrels

from callbacks.evaluation import Evaluator
from callbacks.exit_grid import cheapest_cell, exit_grid, exit_grid_figure, grid_table
from datamodules.eval_sets import EvalSet

DIMS = (8, 32)


def _sides(generator, rows, exits=(1, 2)):
    out = {}
    for key in (None, *exits):
        full = torch.nn.functional.normalize(torch.randn(rows, max(DIMS), generator=generator), dim=-1)
        for dim in DIMS:
            out[dim if key is None else (key, dim)] = torch.nn.functional.normalize(full[:, :dim], dim=-1)
    return out


def _rows(prefix, count):
    return [{"id": f"{prefix}{i}", "text": f"{prefix} {i}"} for i in range(count)]


def test_every_exit_is_scored_from_its_own_embeddings_under_exit_tags():
    generator = torch.Generator().manual_seed(0)
    qrels = _random_qrels(generator, 20, 60, graded=False)
    eval_set = EvalSet("random", _rows("q", 20), _rows("d", 60), qrels)
    queries, corpus = _sides(generator, 20), _sides(generator, 60)
    scores = Evaluator(ks=(10,)).score(eval_set, queries, corpus)
    for layer in (None, 1, 2):
        for dim in DIMS:
            key = dim if layer is None else (layer, dim)
            reference = _pytrec_reference((queries[key] @ corpus[key].T).double(), qrels, ks=(10,))
            tag = f"ndcg@10/d{dim}" if layer is None else f"ndcg@10/L{layer}/d{dim}"
            assert scores[tag] == pytest.approx(reference["ndcg@10"], abs=1e-6), tag
    # A corpus without exits (a frozen document tower) is read at full depth for every exit.
    full_corpus = {dim: corpus[dim] for dim in DIMS}
    scores = Evaluator(ks=(10,)).score(eval_set, queries, full_corpus)
    reference = _pytrec_reference((queries[(1, 32)] @ corpus[32].T).double(), qrels, ks=(10,))
    assert scores["ndcg@10/L1/d32"] == pytest.approx(reference["ndcg@10"], abs=1e-6)


def test_the_grid_its_table_and_the_cheapest_cell_keeping_a_share_of_the_best():
    scores = {
        "ndcg@10/d8": 0.60, "ndcg@10/d32": 0.70,
        "ndcg@10/L4/d8": 0.62, "ndcg@10/L4/d32": 0.64,
        "ndcg@10/L2/d8": 0.40, "ndcg@10/L2/d32": 0.50,
        "recall@10/L2/d8": 0.9, "index_bytes_float32/d8": 1.0,
    }  # fmt: skip
    grid = exit_grid(scores, "ndcg@10", depth=8)
    assert grid == {2: {8: 0.40, 32: 0.50}, 4: {8: 0.62, 32: 0.64}, 8: {8: 0.60, 32: 0.70}}
    best, cheapest = cheapest_cell(grid, depth=8, corpus_rows=1000, share=0.9)
    assert (best.layer, best.dim) == (8, 32)
    # 0.9 * 0.70 = 0.63: L2 is too weak, L4/d8 (0.62) too, L4/d32 (0.64) is the cheapest that keeps it.
    assert (cheapest.layer, cheapest.dim, cheapest.flops_share) == (4, 32, 0.5)
    assert cheapest.index_bytes == 1000 * 32 * 4
    table = grid_table("demo", grid, depth=8, corpus_rows=1000).splitlines()
    assert table[1].split()[:4] == ["L8", "(full)", "0.6000", "0.7000"] and table[-2].split()[:3] == [
        "L2",
        "0.4000",
        "0.5000",
    ]
    figure = exit_grid_figure(grid, 8, "ndcg@10", "demo")
    assert [label.get_text() for label in figure.axes[0].get_yticklabels()] == ["L8 (full)", "L4", "L2"]
