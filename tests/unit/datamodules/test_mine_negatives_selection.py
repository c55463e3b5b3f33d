"""The miner's choice from a ranking: the positive never, ranks START..END of the others, a margin."""

from __future__ import annotations

import torch

from callbacks.metrics import top_k_search
from datamodules.mine_negatives import select_negatives


def test_the_window_and_margin_match_a_full_sort_and_never_hold_the_positive():
    generator = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(20, 8, generator=generator), dim=1)
    documents = torch.nn.functional.normalize(torch.randn(60, 8, generator=generator), dim=1)
    positives = [3 * i if i % 5 else None for i in range(20)]  # some positives outside the corpus
    positive_scores = torch.tensor(
        [float(queries[i] @ documents[p]) if p is not None else 0.5 for i, p in enumerate(positives)]
    )
    scores, indices = top_k_search(queries, documents, 9, query_chunk_size=7, document_chunk_size=11)
    for margin in (None, 0.05):
        chosen = select_negatives(scores, indices, positives, positive_scores, (3, 8), margin)
        for i, negatives in enumerate(chosen):
            full = sorted(range(60), key=lambda d: -float(queries[i] @ documents[d]))
            others = [d for d in full if d != positives[i]]
            expected = others[2:8]
            if margin is not None:
                expected = [
                    d
                    for d in expected
                    if float(queries[i] @ documents[d]) <= float(positive_scores[i]) - margin
                ]
            assert negatives == expected
            assert positives[i] not in negatives
