"""The retrieval metrics and top_k_search against pytrec_eval and a dense reference."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from callbacks.metrics import metrics_from_ranking, top_k_search


def retrieval_metrics(scores: torch.Tensor, qrels, ks=(5, 10)) -> dict[str, float]:
    """The metrics of a dense ``[queries, documents]`` score matrix, through the evaluator's path:
    scores @ identity are the scores, searched and ranked as eval sets are."""
    _, ranked = top_k_search(scores, torch.eye(scores.shape[1], dtype=scores.dtype), max(ks))
    return metrics_from_ranking(ranked, qrels, ks)


pytrec_eval = pytest.importorskip("pytrec_eval")


def _random_qrels(generator: torch.Generator, num_queries: int, num_docs: int, graded: bool) -> dict:
    qrels = {}
    for query in range(num_queries):
        count = int(torch.randint(1, 6, (1,), generator=generator))
        docs = torch.randperm(num_docs, generator=generator)[:count].tolist()
        grades = torch.randint(1, 4, (count,), generator=generator).tolist() if graded else [1] * count
        qrels[query] = dict(zip(docs, grades, strict=True))
    return qrels


def _pytrec_reference(scores: torch.Tensor, qrels: dict, ks=(5, 10)) -> dict:
    """Means over queries of pytrec_eval's ndcg_cut/recall, and recip_rank on the top-k run (= MRR@k)."""
    trec_qrels = {f"q{q}": {f"d{d}": int(g) for d, g in docs.items()} for q, docs in qrels.items()}
    full_run = {
        f"q{q}": {f"d{d}": float(scores[q, d]) for d in range(scores.shape[1])}
        for q in range(scores.shape[0])
    }
    measures = {f"ndcg_cut_{k}" for k in ks} | {f"recall_{k}" for k in ks}
    per_query = pytrec_eval.RelevanceEvaluator(trec_qrels, measures).evaluate(full_run)
    reference = {}
    for k in ks:
        reference[f"ndcg@{k}"] = sum(r[f"ndcg_cut_{k}"] for r in per_query.values()) / len(per_query)
        reference[f"recall@{k}"] = sum(r[f"recall_{k}"] for r in per_query.values()) / len(per_query)
        top_run = {
            q: dict(sorted(docs.items(), key=lambda item: -item[1])[:k]) for q, docs in full_run.items()
        }
        rr = pytrec_eval.RelevanceEvaluator(trec_qrels, {"recip_rank"}).evaluate(top_run)
        reference[f"mrr@{k}"] = sum(r["recip_rank"] for r in rr.values()) / len(rr)
    return reference


@pytest.mark.parametrize("graded", [False, True])
def test_retrieval_metrics_agree_with_pytrec_eval(graded):
    generator = torch.Generator().manual_seed(7 + graded)
    num_queries, num_docs = 60, 300
    scores = torch.randn(num_queries, num_docs, generator=generator, dtype=torch.float64)
    qrels = _random_qrels(generator, num_queries, num_docs, graded)
    # Make some relevant documents rank high so the metrics are far from zero.
    for query, docs in qrels.items():
        for doc in list(docs)[:1]:
            scores[query, doc] += 2.5
    assert scores.flatten().unique().numel() == scores.numel(), "scores must be tie-free"
    ours = retrieval_metrics(scores, qrels)
    reference = _pytrec_reference(scores, qrels)
    for name, value in reference.items():
        assert ours[name] == pytest.approx(value, abs=1e-6), name
    assert 0.2 < ours["ndcg@10"] < 0.95  # a meaningful, non-degenerate case


def test_queries_without_relevant_documents_are_left_out_and_counted():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3], [0.1, 0.2, 0.3]])
    qrels = {0: {0: 1}, 1: {2: 1, 1: 0}}  # query 1's only positive grade is doc 2; query 2 has none
    results = retrieval_metrics(scores, qrels, ks=(1, 2))
    assert results["num_queries"] == 2 and results["num_queries_without_relevant"] == 1
    assert results["ndcg@1"] == pytest.approx(0.5)  # query 0 hits at rank 1, query 1 misses
    assert results["mrr@2"] == pytest.approx((1.0 + 0.5) / 2)


def test_ties_are_broken_by_document_index():
    scores = torch.zeros(1, 6)
    results = metrics_from_ranking(
        top_k_search(torch.ones(1, 1), torch.zeros(6, 1), k=3)[1], {0: {1: 1}}, ks=(3,)
    )
    assert results["mrr@3"] == pytest.approx(0.5)  # doc 0 first, doc 1 second
    assert retrieval_metrics(scores, {0: {1: 1}}, ks=(3,))["mrr@3"] == pytest.approx(0.5)


def test_chunked_search_is_exact_with_ties_and_ragged_chunks():
    generator = torch.Generator().manual_seed(0)
    queries = torch.randint(0, 3, (37, 4), generator=generator).float()
    documents = torch.randint(0, 3, (1001, 4), generator=generator).float()
    scores, indices = top_k_search(queries, documents, k=10, query_chunk_size=8, document_chunk_size=97)
    dense = queries @ documents.T
    reference = torch.sort(dense, dim=1, descending=True, stable=True)[1][:, :10]
    assert torch.equal(indices, reference)
    assert torch.equal(scores, dense.gather(1, reference))


# A fresh interpreter, so its peak memory is the search's own: ~20 s, hence out of the quick unit run.
@pytest.mark.integration
def test_chunked_search_of_a_large_corpus_is_exact_and_never_dense():
    """1,000 x 100,000: same ranking as the dense reference; peak memory far below a dense Q x D."""
    script = textwrap.dedent(
        """
        import resource, torch
        from callbacks.metrics import top_k_search
        torch.manual_seed(0)
        q = torch.nn.functional.normalize(torch.randn(1000, 32), dim=-1)
        d = torch.nn.functional.normalize(torch.randn(100_000, 32), dim=-1)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        scores, indices = top_k_search(q, d, k=10, query_chunk_size=256, document_chunk_size=8192)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        torch.save({"indices": indices, "growth_kib": after - before}, "out.pt")
        """
    )
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
        subprocess.run([sys.executable, "-c", script], cwd=tmp, check=True, env=env)
        result = torch.load(Path(tmp) / "out.pt")
    dense_bytes = 1000 * 100_000 * 4
    assert result["growth_kib"] * 1024 < dense_bytes / 10, result["growth_kib"]
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(1000, 32), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(100_000, 32), dim=-1)
    for start in range(0, 1000, 250):  # reference in row blocks, each a full stable sort
        block = q[start : start + 250] @ d.T
        reference = torch.sort(block, dim=1, descending=True, stable=True)[1][:, :10]
        assert torch.equal(result["indices"][start : start + 250], reference)


def test_classification_metrics_match_a_confusion_matrix_computation():
    import numpy as np

    from callbacks.metrics import classification_metrics

    rng = np.random.default_rng(0)
    gold = rng.integers(0, 5, size=200)
    predicted = np.where(rng.random(200) < 0.6, gold, rng.integers(0, 6, size=200))  # 5 = never gold
    confusion = np.zeros((6, 6))
    np.add.at(confusion, (gold, predicted), 1)
    labels = [0, 1, 2, 3, 4]
    true_positive = np.diag(confusion)[labels]
    recall = true_positive / confusion[labels].sum(axis=1)
    precision = true_positive / np.maximum(confusion[:, labels].sum(axis=0), 1)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0)
    metrics = classification_metrics(predicted.tolist(), gold.tolist(), labels)
    assert metrics["accuracy"] == pytest.approx((predicted == gold).mean())
    assert metrics["macro_recall"] == pytest.approx(recall.mean())
    assert metrics["macro_f1"] == pytest.approx(f1.mean())
    assert classification_metrics([1, 1], [0, 1], [0, 1]) == {
        "accuracy": 0.5,
        "macro_recall": 0.5,
        "macro_f1": pytest.approx(1 / 3),
    }
