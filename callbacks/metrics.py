"""Retrieval metrics (nDCG, Recall, MRR at k) and exact chunked top-k search.

Conventions follow trec_eval / pytrec_eval: linear gain, log2 discounts, the ideal DCG built from
every judged relevant document of the query, recall over all relevant documents. Ties in score
are broken by document index (lower first), so results are deterministic. Queries with no
relevant document are left out of the means and counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch


def _stable_top_k(scores: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per row by score descending, ties by index ascending, for any ordering of the columns."""
    by_index = torch.argsort(indices, dim=1, stable=True)
    scores, indices = scores.gather(1, by_index), indices.gather(1, by_index)
    by_score = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, by_score), indices.gather(1, by_score)


def _block_top_k(block: torch.Tensor, k: int) -> torch.Tensor:
    """Column positions of each row's k best scores, ties at the k-th score going to lower positions.

    ``torch.topk`` is fast but picks arbitrarily among values tied across the cut; only rows with
    such a tie (rare with real embeddings) pay for a stable sort.
    """
    values, order = torch.topk(block, k, dim=1)
    kth = values[:, -1:]
    tied_across_cut = (block == kth).sum(dim=1) > (values == kth).sum(dim=1)
    if tied_across_cut.any():
        rows = tied_across_cut.nonzero().squeeze(1)
        order[rows] = torch.argsort(block[rows], dim=1, descending=True, stable=True)[:, :k]
    return order


def top_k_search(
    queries: torch.Tensor,
    documents: torch.Tensor,
    k: int,
    query_chunk_size: int = 1024,
    document_chunk_size: int = 16384,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k documents per query by dot product, without materializing all scores.

    Memory is ``query_chunk x (document_chunk + k)`` scores at a time; each document chunk's
    candidates are merged into a running top-k. Returns (scores ``[Q, k']``, indices ``[Q, k']``)
    with ``k' = min(k, num_documents)``.
    """
    num_documents = documents.shape[0]
    k = min(k, num_documents)
    all_scores, all_indices = [], []
    for q_start in range(0, queries.shape[0], query_chunk_size):
        query_block = queries[q_start : q_start + query_chunk_size]
        best_scores = query_block.new_empty((query_block.shape[0], 0))
        best_indices = torch.empty((query_block.shape[0], 0), dtype=torch.long, device=queries.device)
        for d_start in range(0, num_documents, document_chunk_size):
            block = query_block @ documents[d_start : d_start + document_chunk_size].T
            order = _block_top_k(block, min(k, block.shape[1]))
            best_scores, best_indices = _stable_top_k(
                torch.cat([best_scores, block.gather(1, order)], dim=1),
                torch.cat([best_indices, order + d_start], dim=1),
                k,
            )
        all_scores.append(best_scores)
        all_indices.append(best_indices)
    return torch.cat(all_scores), torch.cat(all_indices)


def metrics_from_ranking(
    ranked_indices: torch.Tensor | Sequence[Sequence[int]],
    qrels: Mapping[int, Mapping[int, float]],
    ks: Sequence[int] = (5, 10),
) -> dict[str, float]:
    """nDCG@k, Recall@k and MRR@k from each query's ranked document indices (at least max(ks) long
    unless the corpus is smaller). Adds ``num_queries`` and ``num_queries_without_relevant``."""
    ranked = ranked_indices.tolist() if isinstance(ranked_indices, torch.Tensor) else ranked_indices
    sums = {f"{name}@{k}": 0.0 for k in ks for name in RETRIEVAL_MEASURES}
    evaluated, without_relevant = 0, 0
    for query, ranking in enumerate(ranked):
        relevant = {doc: grade for doc, grade in qrels.get(query, {}).items() if grade > 0}
        if not relevant:
            without_relevant += 1
            continue
        evaluated += 1
        ideal = sorted(relevant.values(), reverse=True)
        for k in ks:
            top = ranking[:k]
            dcg = sum(relevant.get(doc, 0) / math.log2(rank + 2) for rank, doc in enumerate(top))
            idcg = sum(grade / math.log2(rank + 2) for rank, grade in enumerate(ideal[:k]))
            sums[f"ndcg@{k}"] += dcg / idcg
            sums[f"recall@{k}"] += sum(1 for doc in top if doc in relevant) / len(relevant)
            first_hit = next((rank for rank, doc in enumerate(top) if doc in relevant), None)
            sums[f"mrr@{k}"] += 0.0 if first_hit is None else 1.0 / (first_hit + 1)
    results = {name: (value / evaluated if evaluated else 0.0) for name, value in sums.items()}
    results["num_queries"] = float(evaluated)
    results["num_queries_without_relevant"] = float(without_relevant)
    return results


# The measures each scoring function reports (retrieval ones at every cut-off k, as "ndcg@10").
RETRIEVAL_MEASURES = ("ndcg", "recall", "mrr")
CLASSIFICATION_METRICS = ("accuracy", "macro_recall", "macro_f1")


def classification_metrics(predicted: Sequence[int], gold: Sequence[int], labels: Sequence[int]) -> dict:
    """Accuracy, macro recall and macro F1 of single-label predictions (nearest label document).

    Macro averages run over ``labels`` (every class that has at least one gold example), so a
    class the model never predicts counts with F1 0 rather than being dropped.
    """
    if len(predicted) != len(gold) or not gold:
        raise ValueError(f"{len(predicted)} predictions for {len(gold)} gold labels.")
    recalls, f1s = [], []
    for label in labels:
        true_positive = sum(1 for p, g in zip(predicted, gold, strict=True) if p == g == label)
        predicted_count = sum(1 for p in predicted if p == label)
        gold_count = sum(1 for g in gold if g == label)
        recall = true_positive / gold_count if gold_count else 0.0
        precision = true_positive / predicted_count if predicted_count else 0.0
        recalls.append(recall)
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    correct = sum(1 for p, g in zip(predicted, gold, strict=True) if p == g)
    return {
        "accuracy": correct / len(gold),
        "macro_recall": sum(recalls) / len(recalls),
        "macro_f1": sum(f1s) / len(f1s),
    }
