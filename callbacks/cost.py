"""What each Matryoshka dim costs at search time: index size and exact-search latency per query."""

from __future__ import annotations

import statistics
import time

import torch

from callbacks.analysis import EmbeddingAnalysis
from callbacks.metrics import top_k_search

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CostPerDimension(EmbeddingAnalysis):
    """Logs ``index_bytes_<dtype>/d<dim>`` (the eval corpus stored at that dim and dtype) and
    ``query_ms_<dtype>/d<dim>`` (exact top-k search of the eval queries against it, per query,
    median of ``repeats`` timed runs), next to nDCG so accuracy against cost is one look.
    The evaluator keeps embeddings on the CPU, so the times are CPU search times (float16 matmul
    is slow on most CPUs; GPU serving would need its own measurement)."""

    def __init__(self, dtypes: tuple[str, ...] = ("float32", "float16"), k: int = 10, repeats: int = 3):
        """
        Args:
            dtypes: Storage dtypes to price (float32, float16, bfloat16).
            k: Documents retrieved per query in the timed search.
            repeats: Timed runs per (dim, dtype); the median is logged.
        """
        unknown = set(dtypes) - set(DTYPES)
        if unknown:
            raise ValueError(
                f"CostPerDimension.dtypes: unknown {sorted(unknown)}; choose from {sorted(DTYPES)}."
            )
        if repeats < 1 or k < 1:
            raise ValueError(f"CostPerDimension: k={k} and repeats={repeats} must be >= 1.")
        self.dtypes = tuple(dtypes)
        self.k = k
        self.repeats = repeats

    def analyze(self, eval_set, embeddings) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for dim in sorted(embeddings["corpus"]):
            for name in self.dtypes:
                documents = embeddings["corpus"][dim].to(DTYPES[name])
                queries = embeddings["queries"][dim].to(DTYPES[name])
                metrics[f"index_bytes_{name}/d{dim}"] = float(documents.numel() * documents.element_size())
                top_k_search(queries, documents, self.k)  # warm-up: first-call allocations are not search
                timings = []
                for _ in range(self.repeats):
                    start = time.perf_counter()
                    top_k_search(queries, documents, self.k)
                    timings.append(time.perf_counter() - start)
                metrics[f"query_ms_{name}/d{dim}"] = 1000 * statistics.median(timings) / max(len(queries), 1)
        return metrics

    def metric_names(self, dims: list[int]) -> set[str]:
        kinds = ("index_bytes", "query_ms")
        return {f"{kind}_{name}/d{dim}" for kind in kinds for name in self.dtypes for dim in dims}
