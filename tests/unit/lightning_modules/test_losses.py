"""matryoshka_info_nce against a direct, loop-based computation."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.losses import matryoshka_info_nce


def _direct_info_nce(queries: torch.Tensor, documents: torch.Tensor, temperature: float) -> float:
    """-mean_i log softmax_j(cos(q_i, d_j) / t)[i], written out with Python loops in float64."""
    q, d = queries.double(), documents.double()
    total = 0.0
    for i in range(q.shape[0]):
        logits = [float(q[i] @ d[j] / (q[i].norm() * d[j].norm())) / temperature for j in range(d.shape[0])]
        log_normalizer = math.log(sum(math.exp(x) for x in logits))
        total += log_normalizer - logits[i]
    return total / q.shape[0]


def _embeddings(seed: int, batch: int = 6, full: int = 16, dims=(4, 8, 16)):
    generator = torch.Generator().manual_seed(seed)
    q_full = torch.randn(batch, full, generator=generator)
    d_full = torch.randn(batch, full, generator=generator)
    return {d: q_full[:, :d] for d in dims}, {d: d_full[:, :d] for d in dims}


def test_equals_sum_over_dims_of_direct_cross_entropy():
    queries, documents = _embeddings(0)
    loss = matryoshka_info_nce(queries, documents, temperature=0.1)
    expected = sum(_direct_info_nce(queries[d], documents[d], 0.1) for d in queries)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_weights_scale_each_dim():
    queries, documents = _embeddings(1)
    weights = {4: 0.5, 8: 2.0}
    loss = matryoshka_info_nce(queries, documents, temperature=0.07, weights=weights)
    expected = sum(weights.get(d, 1.0) * _direct_info_nce(queries[d], documents[d], 0.07) for d in queries)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_gradients_flow_to_both_sides():
    queries, documents = _embeddings(2)
    leaf_q = {d: v.clone().requires_grad_() for d, v in queries.items()}
    leaf_d = {d: v.clone().requires_grad_() for d, v in documents.items()}
    matryoshka_info_nce(leaf_q, leaf_d, temperature=0.05).backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in [*leaf_q.values(), *leaf_d.values()])


def test_bad_inputs_are_named():
    queries, documents = _embeddings(3)
    with pytest.raises(ValueError, match="dims"):
        matryoshka_info_nce(queries, {4: documents[4]}, temperature=0.1)
    with pytest.raises(ValueError, match="temperature"):
        matryoshka_info_nce(queries, documents, temperature=0.0)


def test_symmetric_is_the_mean_of_both_directions_per_dim():
    queries, documents = _embeddings(4)
    weights = {8: 3.0}
    loss = matryoshka_info_nce(queries, documents, temperature=0.1, weights=weights, symmetric=True)
    # The document -> query direction is the same computation with the roles swapped.
    expected = sum(
        weights.get(d, 1.0)
        * (_direct_info_nce(queries[d], documents[d], 0.1) + _direct_info_nce(documents[d], queries[d], 0.1))
        / 2
        for d in queries
    )
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    one_way = matryoshka_info_nce(queries, documents, temperature=0.1, weights=weights)
    assert abs(float(loss) - float(one_way)) > 1e-3  # the second direction changes the value


def _direct_masked(queries, documents, keys, temperature: float) -> float:
    """As _direct_info_nce, each row scored only against columns that are not a copy of its document."""
    q, d = queries.double(), documents.double()
    total = 0.0
    for i in range(q.shape[0]):
        columns = [j for j in range(d.shape[0]) if j == i or keys[j] != keys[i]]
        logits = {j: float(q[i] @ d[j] / (q[i].norm() * d[j].norm())) / temperature for j in columns}
        total += math.log(sum(math.exp(x) for x in logits.values())) - logits[i]
    return total / q.shape[0]


@pytest.mark.parametrize("symmetric", [False, True], ids=["one-way", "symmetric"])
def test_copies_of_a_rows_own_document_are_not_its_negatives(symmetric):
    queries, documents = _embeddings(5)
    # Rows 0, 2 and 5 hold one document (three voices reading it), rows 1 and 3 another.
    keys = torch.tensor([7, 9, 7, 9, 11, 7])
    for dim in documents:
        for copy in (2, 5):
            documents[dim][copy] = documents[dim][0]
        documents[dim][3] = documents[dim][1]
    loss = matryoshka_info_nce(queries, documents, temperature=0.1, symmetric=symmetric, document_keys=keys)

    def direct(d):
        forward = _direct_masked(queries[d], documents[d], keys.tolist(), 0.1)
        if not symmetric:
            return forward
        return (forward + _direct_masked(documents[d], queries[d], keys.tolist(), 0.1)) / 2

    assert float(loss) == pytest.approx(sum(direct(d) for d in queries), rel=1e-5)
    unmasked = matryoshka_info_nce(queries, documents, temperature=0.1, symmetric=symmetric)
    assert float(unmasked) > float(loss) + 0.1  # the copies counted as negatives before
    distinct = torch.arange(6)  # no two rows alike: the plain loss
    plain = matryoshka_info_nce(
        queries, documents, temperature=0.1, symmetric=symmetric, document_keys=distinct
    )
    assert float(plain) == float(unmasked)
