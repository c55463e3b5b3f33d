"""The losses: matryoshka_info_nce against a direct, loop-based computation; the loss modules' settings,
weighted sums and rebuilding from a checkpoint's plain data."""

from __future__ import annotations

import io
import math

import pytest
import torch

from errors import ConfigError
from lightning_modules.losses import (
    LossInputs,
    MatryoshkaInfoNCE,
    TranscriptionAlignment,
    WeightedSum,
    loss_from_config,
    matryoshka_info_nce,
)


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


def _direct_alignment(queries, targets) -> float:
    """sum over dims of mean_i [(1 - cos(q_i, t_i)) + mean_k |q_ik - t_ik|], unit vectors, float64."""
    total = 0.0
    for dim in queries:
        q = torch.nn.functional.normalize(queries[dim].double(), dim=-1)
        t = torch.nn.functional.normalize(targets[dim].double(), dim=-1)
        total += float((1 - (q * t).sum(-1)).mean() + (q - t).abs().mean())
    return total


def test_infonce_module_applies_its_settings():
    queries, documents = _embeddings(3)
    loss = MatryoshkaInfoNCE(temperature=0.2, dim_weights={8: 3.0})
    expected = sum(
        (3.0 if d == 8 else 1.0) * _direct_info_nce(queries[d], documents[d], 0.2) for d in queries
    )
    assert float(loss(LossInputs(queries, documents))) == pytest.approx(expected, rel=1e-5)
    assert loss.needs == {"documents"} and loss.min_rows() == 2  # one process: two rows at least


def test_weighted_sum_names_weights_and_needs_its_terms():
    queries, documents = _embeddings(4)
    targets, _ = _embeddings(5)
    loss = WeightedSum([MatryoshkaInfoNCE(temperature=0.1), TranscriptionAlignment()], [1.0, 0.5])
    terms = loss.terms(LossInputs(queries, documents, transcriptions=targets))
    assert set(terms) == {"info_nce", "alignment"}
    info_nce = sum(_direct_info_nce(queries[d], documents[d], 0.1) for d in queries)
    assert float(terms["info_nce"]) == pytest.approx(info_nce, rel=1e-5)
    assert float(terms["alignment"]) == pytest.approx(0.5 * _direct_alignment(queries, targets), rel=1e-5)
    total = loss(LossInputs(queries, documents, transcriptions=targets))
    assert float(total) == pytest.approx(info_nce + 0.5 * _direct_alignment(queries, targets), rel=1e-5)
    assert loss.needs == {"documents", "transcriptions"} and loss.min_rows() == 2


def test_a_loss_rebuilds_from_its_plain_config():
    loss = WeightedSum(
        [MatryoshkaInfoNCE(temperature=0.3, symmetric=True, dim_weights={4: 2.0}), TranscriptionAlignment()],
        [1.0, 0.25],
    )
    config = loss.config()
    # Plain data only: checkpoints are read with torch.load(weights_only=True).
    buffer = io.BytesIO()
    torch.save(config, buffer)
    buffer.seek(0)
    rebuilt = loss_from_config(torch.load(buffer, weights_only=True))
    assert rebuilt.config() == config
    queries, documents = _embeddings(6)
    inputs = LossInputs(queries, documents, transcriptions=documents)
    assert torch.equal(rebuilt(inputs), loss(inputs))


def test_bad_loss_settings_are_named():
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        MatryoshkaInfoNCE(temperature=0)
    with pytest.raises(ConfigError, match="one weight per loss"):
        WeightedSum([MatryoshkaInfoNCE()], [1.0, 2.0])
    with pytest.raises(ConfigError, match=r"dim_weights names dims \[3\]"):
        WeightedSum([TranscriptionAlignment(dim_weights={3: 1.0})]).check_dims([4, 8])


def test_spread_out_equals_a_direct_computation_of_the_moments():
    """Zhang et al.'s global orthogonal regularization, per dim, from NumPy loops over the pairs."""
    import numpy as np

    from lightning_modules.losses import LossInputs, SpreadOut

    generator = torch.Generator().manual_seed(0)
    queries = {d: torch.randn(5, d, generator=generator) for d in (4, 16)}
    documents = {
        d: torch.randn(5, d, generator=generator) + 0.5 for d in (4, 16)
    }  # a shared offset: mean > 0
    keys = torch.tensor([0, 1, 2, 3, 1])  # rows 1 and 4 share a document: not a pair to spread
    loss = SpreadOut(dim_weights={16: 0.5})
    got = loss(LossInputs(queries, documents, document_keys=keys))
    expected = 0.0
    for dim, weight in ((4, 1.0), (16, 0.5)):
        q = queries[dim].numpy() / np.linalg.norm(queries[dim].numpy(), axis=1, keepdims=True)
        t = documents[dim].numpy() / np.linalg.norm(documents[dim].numpy(), axis=1, keepdims=True)
        pairs = [q[i] @ t[j] for i in range(5) for j in range(5) if i != j and keys[i] != keys[j]]
        first, second = np.mean(pairs), np.mean(np.square(pairs))
        expected += weight * (first**2 + max(0.0, second - 1 / dim))
    assert abs(float(got) - expected) < 1e-6
    assert float(got) > 0.01  # the offset documents are not spread out
    assert loss.config() == {
        "class_path": "lightning_modules.losses.SpreadOut",
        "init_args": {"dim_weights": {16: 0.5}},
    }
