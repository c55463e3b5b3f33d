"""InfoNCE with hard negatives against a loop-based reference: one-way and symmetric, per dim,
every row's negatives or only its own, copies of a row's document masked whichever row lists them;
without negatives the loss is the in-batch one, bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.hard_negatives import HardNegatives
from lightning_modules.losses import LossInputs, MatryoshkaInfoNCE, matryoshka_info_nce

DIMS = (4, 8, 16)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()))


def _reference(queries, documents, keys, negatives, owners, negative_keys, temperature, own_only, symmetric):
    """One dim: -mean_i log softmax over row i's candidates, written out with loops in float64.

    Row i's candidates: its document, every other document that is not a copy of it (by key), and
    the negatives (all rows', or its own) that are not a copy of its document. The document -> query
    direction (symmetric) scores each document against the queries, as without negatives."""
    rows = queries.shape[0]
    total = 0.0
    for i in range(rows):
        logits = [_cos(queries[i], documents[i]) / temperature]
        logits += [
            _cos(queries[i], documents[j]) / temperature for j in range(rows) if j != i and keys[j] != keys[i]
        ]
        logits += [
            _cos(queries[i], negatives[m]) / temperature
            for m in range(negatives.shape[0])
            if negative_keys[m] != keys[i] and (not own_only or owners[m] == i)
        ]
        total += math.log(sum(math.exp(x) for x in logits)) - logits[0]
    forward = total / rows
    if not symmetric:
        return forward
    total = 0.0
    for i in range(rows):
        logits = [_cos(documents[i], queries[i]) / temperature]
        logits += [
            _cos(documents[i], queries[j]) / temperature for j in range(rows) if j != i and keys[j] != keys[i]
        ]
        total += math.log(sum(math.exp(x) for x in logits)) - logits[0]
    return (forward + total / rows) / 2


def _batch(seed: int, rows: int = 5, negatives_per_row=(2, 0, 3, 1, 2)):
    generator = torch.Generator().manual_seed(seed)
    full = 16
    queries = torch.randn(rows, full, generator=generator)
    documents = torch.randn(rows, full, generator=generator)
    owners = torch.tensor([row for row, count in enumerate(negatives_per_row) for _ in range(count)])
    negatives = torch.randn(len(owners), full, generator=generator)
    keys = torch.arange(100, 100 + rows)
    negative_keys = torch.arange(200, 200 + len(owners))
    # Rows 0 and 3 share a document; row 2's second negative is row 4's document (a false negative
    # for row 4), and row 0's first negative is a copy of its own document (a mislabelled row).
    documents[3] = documents[0]
    keys[3] = keys[0]
    negatives[owners.tolist().index(2) + 1] = documents[4]
    negative_keys[owners.tolist().index(2) + 1] = keys[4]
    negatives[0] = documents[0]
    negative_keys[0] = keys[0]
    return queries, documents, keys, negatives, owners, negative_keys


def _dims(tensor: torch.Tensor) -> dict[int, torch.Tensor]:
    return {d: tensor[:, :d] for d in DIMS}


@pytest.mark.parametrize("symmetric", [False, True], ids=["one-way", "symmetric"])
@pytest.mark.parametrize("own_only", [False, True], ids=["every-rows-negatives", "own-negatives"])
def test_equals_a_loop_based_reference_per_dim(symmetric, own_only):
    queries, documents, keys, negatives, owners, negative_keys = _batch(0)
    hard = HardNegatives(_dims(negatives), owners, negative_keys)
    for dim in DIMS:  # one dim at a time: the others weigh 0
        weights = {d: (1.0 if d == dim else 0.0) for d in DIMS}
        loss = matryoshka_info_nce(
            _dims(queries),
            _dims(documents),
            temperature=0.1,
            weights=weights,
            symmetric=symmetric,
            document_keys=keys,
            negatives=hard,
            own_negatives_only=own_only,
        )
        expected = _reference(
            queries[:, :dim],
            documents[:, :dim],
            keys.tolist(),
            negatives[:, :dim],
            owners.tolist(),
            negative_keys.tolist(),
            0.1,
            own_only,
            symmetric,
        )
        assert float(loss) == pytest.approx(expected, rel=1e-5), f"dim {dim}"


def test_the_module_passes_its_switch_and_the_negatives_change_the_loss():
    queries, documents, keys, negatives, owners, negative_keys = _batch(1)
    hard = HardNegatives(_dims(negatives), owners, negative_keys)
    inputs = LossInputs(_dims(queries), _dims(documents), document_keys=keys, negatives=hard)
    shared = MatryoshkaInfoNCE(temperature=0.1)(inputs)
    own = MatryoshkaInfoNCE(temperature=0.1, own_negatives_only=True)(inputs)
    in_batch = MatryoshkaInfoNCE(temperature=0.1)(
        LossInputs(_dims(queries), _dims(documents), document_keys=keys)
    )
    assert float(shared) > float(own) > float(in_batch)  # more negatives in the denominator, a larger loss
    expected = sum(
        _reference(
            queries[:, :d],
            documents[:, :d],
            keys.tolist(),
            negatives[:, :d],
            owners.tolist(),
            negative_keys.tolist(),
            0.1,
            True,
            False,
        )
        for d in DIMS
    )
    assert float(own) == pytest.approx(expected, rel=1e-5)


def test_without_negatives_the_loss_is_the_in_batch_one_exactly():
    queries, documents, keys, *_ = _batch(2)
    empty = HardNegatives(
        {d: torch.zeros(0, d) for d in DIMS},
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
    )
    for symmetric in (False, True):
        today = matryoshka_info_nce(
            _dims(queries), _dims(documents), 0.05, symmetric=symmetric, document_keys=keys
        )
        for negatives in (None, empty):
            got = matryoshka_info_nce(
                _dims(queries),
                _dims(documents),
                0.05,
                symmetric=symmetric,
                document_keys=keys,
                negatives=negatives,
            )
            assert torch.equal(got, today)


def test_gradients_reach_the_negatives_and_masked_ones_get_none():
    queries, documents, keys, negatives, owners, negative_keys = _batch(3)
    leaf = negatives.clone().requires_grad_()
    hard = HardNegatives({d: leaf[:, :d] for d in DIMS}, owners, negative_keys)
    matryoshka_info_nce(
        _dims(queries), _dims(documents), 0.1, document_keys=keys, negatives=hard, own_negatives_only=True
    ).backward()
    norms = leaf.grad.norm(dim=1)
    # Negative 0 is a copy of its own row's document: masked for that row, and (own only) unseen by
    # every other row. Every other negative is seen by its own row.
    assert norms[0] == 0
    assert (norms[1:] > 0).all()
