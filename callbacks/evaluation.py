"""Scoring eval sets from their embeddings, without a Trainer: metrics per Matryoshka dim, analyses.

``Evaluator(ks=(5, 10)).score(eval_set, queries, corpus)`` takes one eval set's query and corpus
embeddings (``{dim: [rows, dim]}``, rows in the eval set's order) and returns what validation logs
under ``<stage>/<eval set>/``:
- retrieval sets: the corpus ranked with an exact chunked top-k; ``ndcg@k``, ``recall@k`` and
  ``mrr@k`` per dim (``ndcg@10/d256``), and ``num_queries_evaluated``;
- classification sets (keyword spotting, zero-shot intent): each query takes its nearest class
  text; ``accuracy``, ``macro_recall`` and ``macro_f1`` per dim, and ``num_queries_evaluated``;
- then every analysis's numbers (effective rank, cost per dim, ...) on the same embeddings;
- for a model that transcribes its spoken queries (``Pipelined``, ``AsrCtc``), given the transcripts:
  ``cer`` and ``wer`` against the queries' own transcriptions (their ``text``), corpus-level
  (edits over reference characters / words, torchmetrics).

``callbacks.retrieval.RetrievalEvaluator`` runs one of these at every validation; embeddings
that ``predict`` wrote (``callbacks.write_embeddings.read_embeddings``) score the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from callbacks.analysis import EmbeddingAnalysis, Embeddings
from callbacks.exit_grid import exit_layers, exit_tag, exit_view
from callbacks.metrics import (
    CLASSIFICATION_METRICS,
    RETRIEVAL_MEASURES,
    classification_metrics,
    metrics_from_ranking,
    top_k_search,
)

if TYPE_CHECKING:
    from datamodules.eval_sets import EvalSet


class Evaluator:
    """Metrics and analyses of eval sets from their embeddings, one tag per (metric, dim)."""

    def __init__(
        self,
        ks: Sequence[int] = (5, 10),
        query_chunk_size: int = 1024,
        document_chunk_size: int = 16384,
        analyses: Sequence[EmbeddingAnalysis] | None = None,
    ):
        """
        Args:
            ks: Cut-offs of nDCG, Recall and MRR.
            query_chunk_size: Queries scored at once (memory ~ query_chunk x document_chunk floats).
            document_chunk_size: Documents scored at once.
            analyses: Further analyses of the same embeddings (e.g. callbacks.effective_rank.EffectiveRank).
        """
        self.ks = tuple(sorted(ks))
        self.query_chunk_size = query_chunk_size
        self.document_chunk_size = document_chunk_size
        self.analyses = list(analyses or [])

    # ----- scoring ------------------------------------------------------------------------
    def score(
        self,
        eval_set: EvalSet,
        queries: Mapping[int, torch.Tensor],
        corpus: Mapping[int, torch.Tensor],
        transcripts: Sequence[str] | None = None,
    ) -> dict[str, float]:
        """The eval set's metrics per dim, ``num_queries_evaluated``, then every analysis's numbers;
        with ``transcripts`` (one per query, in row order), ``cer`` and ``wer`` too.

        With early exits (``(layer, dim)`` keys, ``lightning_modules/components/early_exit.py``)
        every exit is scored as well, under ``<metric>/L<layer>/d<dim>``; the analyses read the
        full depth."""
        full_queries, full_corpus = exit_view(queries, None), exit_view(corpus, None)
        scores = self.metrics(eval_set, full_queries, full_corpus)
        for layer in sorted({*exit_layers(queries), *exit_layers(corpus)}):
            at_exit = self.metrics(eval_set, exit_view(queries, layer), exit_view(corpus, layer))
            scores |= {exit_tag(tag, layer): value for tag, value in at_exit.items() if "/d" in tag}
        for analysis in self.analyses:
            scores |= analysis.analyze(eval_set, {"queries": full_queries, "corpus": full_corpus})
        if transcripts is not None:
            scores |= transcription_scores(eval_set, transcripts)
        return scores

    def evaluate(
        self,
        eval_sets: Mapping[str, EvalSet],
        embeddings: Mapping[str, Embeddings],
        transcripts: Mapping[str, Sequence[str]] | None = None,
    ) -> dict[str, dict[str, float]]:
        """``score`` of every eval set in ``embeddings`` (``{name: {"queries": ..., "corpus": ...}}``),
        with its transcripts where ``transcripts`` (``{name: [one per query]}``) has them."""
        transcripts = transcripts or {}
        return {
            name: self.score(eval_sets[name], sides["queries"], sides["corpus"], transcripts.get(name))
            for name, sides in embeddings.items()
        }

    def metrics(
        self, eval_set: EvalSet, queries: Mapping[int, torch.Tensor], corpus: Mapping[int, torch.Tensor]
    ) -> dict[str, float]:
        """The evaluator's own metrics (no analyses): ``<metric>/d<dim>`` and ``num_queries_evaluated``."""
        for side, embeddings, rows in (
            ("queries", queries, eval_set.queries),
            ("corpus", corpus, eval_set.corpus),
        ):
            if not rows:
                raise ValueError(f"eval set {eval_set.name!r} has no {side}: nothing to score.")
            for dim, values in embeddings.items():
                if values.shape[0] != len(rows):
                    raise ValueError(
                        f"eval set {eval_set.name!r}: {values.shape[0]} {side} embeddings at d{dim} for "
                        f"{len(rows)} rows; rows must be the eval set's, in its order."
                    )
        if eval_set.kind == "classification":
            return self._classification_metrics(eval_set, queries, corpus)
        return self._retrieval_metrics(eval_set, queries, corpus)

    def _retrieval_metrics(self, eval_set, queries, corpus) -> dict[str, float]:
        scores = {}
        for dim in sorted(queries):
            _, ranked = top_k_search(
                queries[dim], corpus[dim], max(self.ks), self.query_chunk_size, self.document_chunk_size
            )
            results = metrics_from_ranking(ranked, eval_set.qrels, self.ks)
            for metric in (f"{m}@{k}" for m in RETRIEVAL_MEASURES for k in self.ks):
                scores[f"{metric}/d{dim}"] = results[metric]
        scores["num_queries_evaluated"] = results["num_queries"]
        return scores

    def _classification_metrics(self, eval_set, queries, corpus) -> dict[str, float]:
        gold = eval_set.gold_labels()
        classes = sorted(set(gold))
        scores = {}
        for dim in sorted(queries):
            _, nearest = top_k_search(
                queries[dim], corpus[dim], 1, self.query_chunk_size, self.document_chunk_size
            )
            results = classification_metrics(nearest[:, 0].tolist(), gold, classes)
            scores |= {f"{metric}/d{dim}": value for metric, value in results.items()}
        scores["num_queries_evaluated"] = len(gold)
        return scores

    # ----- what it logs -------------------------------------------------------------------
    def own_metric_names(self, kind: str, dims: Sequence[int]) -> set[str]:
        """The tags ``metrics`` returns for an eval set of this kind (not the analyses')."""
        if kind == "retrieval":
            names = {
                f"{measure}@{k}/d{dim}" for measure in RETRIEVAL_MEASURES for k in self.ks for dim in dims
            }
        else:
            names = {f"{metric}/d{dim}" for metric in CLASSIFICATION_METRICS for dim in dims}
        return names | {"num_queries_evaluated"}

    def metric_names(self, kind: str, dims: Sequence[int]) -> set[str] | None:
        """Every tag ``score`` returns for an eval set of this kind; None when an analysis does not
        declare its names (they cannot all be known)."""
        names = self.own_metric_names(kind, dims)
        for analysis in self.analyses:
            declared = analysis.metric_names(list(dims))
            if declared is None:
                return None
            names |= declared
        return names

    def headline_metric(self, kind: str) -> str:
        """The metric a one-line summary and the metrics figure lead with."""
        return "accuracy" if kind == "classification" else f"ndcg@{max(self.ks)}"

    # ----- figures ------------------------------------------------------------------------
    def figures(self, eval_set: EvalSet, scores: Mapping[str, float], title: str) -> dict:
        """Matplotlib figures of one ``score`` result: the metrics (and costs) against the dim, and
        each analysis's figures of its last ``analyze`` of this set."""
        from callbacks.dashboards import metrics_vs_dimension

        classifying = eval_set.kind == "classification"
        main = ("accuracy", "macro_f1") if classifying else (self.headline_metric(eval_set.kind),)
        figures = {"metrics_vs_dim": metrics_vs_dimension(scores, main, title)}
        for analysis in self.analyses:
            figures |= analysis.figures(eval_set)
        return figures


TRANSCRIPTION_METRICS = ("cer", "wer")


def transcription_scores(eval_set: EvalSet, transcripts: Sequence[str]) -> dict[str, float]:
    """``cer`` and ``wer`` of one transcript per query (row order) against the queries' ``text``;
    queries without a transcription are left out (``num_queries_transcribed`` counts the rest)."""
    from torchmetrics.functional.text import char_error_rate, word_error_rate

    if len(transcripts) != len(eval_set.queries):
        raise ValueError(
            f"eval set {eval_set.name!r}: {len(transcripts)} transcripts for {len(eval_set.queries)} queries."
        )
    pairs = [
        (hypothesis, row["text"])
        for hypothesis, row in zip(transcripts, eval_set.queries, strict=True)
        if isinstance(row.get("text"), str) and row["text"].strip()
    ]
    if not pairs:
        return {}
    hypotheses, references = map(list, zip(*pairs, strict=True))
    return {
        "cer": float(char_error_rate(hypotheses, references)),
        "wer": float(word_error_rate(hypotheses, references)),
        "num_queries_transcribed": len(pairs),
    }
