"""n-shot classification (callbacks/few_shot.py) against direct computations and scikit-learn."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from callbacks.few_shot import (
    FewShotData,
    FewShotSettings,
    contrastive_pairs,
    cosine_pair_loss,
    draw_examples,
    few_shot_scores,
    few_shot_table,
    head_predictions,
    logistic_head,
    prediction_scores,
    summary,
    weights_restored,
)
from callbacks.metrics import classification_metrics
from errors import ConfigError, DataError


def test_pairs_are_same_class_positive_and_cross_class_negative():
    labels = [0, 0, 0, 1, 1, 2]
    pairs = contrastive_pairs(labels, iterations=7, seed=3)
    # SetFit: per iteration, each example once with its class and once with another class.
    assert len(pairs) == 2 * 7 * len(labels)
    for first, second, label in pairs:
        assert label == float(labels[first] == labels[second])
        assert first != second or first == 5  # 5 is its class's only example
    starts = [first for first, _, _ in pairs]
    assert all(starts.count(position) == 14 for position in range(len(labels)))
    # The positives cover every same-class pair over enough iterations, never a cross-class one.
    positives = {frozenset((a, b)) for a, b, label in contrastive_pairs(labels, 200, 0) if label}
    expected = {frozenset(p) for p in itertools.combinations(range(6), 2) if labels[p[0]] == labels[p[1]]}
    assert positives == expected | {frozenset((5,))}


def test_a_class_of_one_is_paired_with_itself():
    pairs = contrastive_pairs([0, 1], iterations=1, seed=0)
    assert sorted(pairs) == [(0, 0, 1.0), (0, 1, 0.0), (1, 0, 0.0), (1, 1, 1.0)]


def test_draws_take_n_per_class_and_follow_the_seed():
    labels = [0] * 5 + [1] * 6 + [2] * 4
    drawn = draw_examples(labels, [0, 1, 2], 3, seed=1)
    assert [labels[p] for p in drawn] == [0] * 3 + [1] * 3 + [2] * 3
    assert draw_examples(labels, [0, 1, 2], 3, seed=1) == drawn
    assert any(draw_examples(labels, [0, 1, 2], 3, seed=s) != drawn for s in range(2, 6))


def test_a_class_with_fewer_than_n_examples_is_named():
    data = _clusters(train_per_class=[4, 2, 4])
    with pytest.raises(DataError, match=r"4-shot needs 4 train examples per class.*'class-1': 2"):
        few_shot_scores(torch.nn.Linear(2, 2), data, FewShotSettings(shots=[1, 4], contrastive=False))


def test_settings_refuse_bad_values():
    with pytest.raises(ConfigError, match="few_shot.shots"):
        FewShotSettings(shots=[-1])
    with pytest.raises(ConfigError, match="draws"):
        FewShotSettings(draws=0)


def test_scores_equal_sklearn_and_the_validation_metrics():
    gold = [0, 0, 1, 1, 1, 2, 2, 3]
    predicted = [0, 1, 1, 1, 2, 2, 0, 0]  # class 3 never predicted: F1 0, still counted
    scores = prediction_scores(predicted, gold, [0, 1, 2, 3])
    validation = classification_metrics(predicted, gold, [0, 1, 2, 3])
    assert scores["accuracy"] == pytest.approx(validation["accuracy"])
    assert scores["macro_f1"] == pytest.approx(validation["macro_f1"])
    # Weighted F1 by hand: each class's F1 weighted by its gold count.
    per_class = {}
    for c in range(4):
        tp = sum(p == g == c for p, g in zip(predicted, gold, strict=True))
        precision = tp / max(1, predicted.count(c))
        recall = tp / gold.count(c)
        per_class[c] = 2 * precision * recall / (precision + recall) if tp else 0.0
    weighted = sum(per_class[c] * gold.count(c) for c in range(4)) / len(gold)
    assert scores["weighted_f1"] == pytest.approx(weighted)


def test_the_head_is_scikit_learns_logistic_regression_on_unit_embeddings():
    generator = torch.Generator().manual_seed(0)
    train, test = torch.randn(12, 8, generator=generator), torch.randn(20, 8, generator=generator)
    labels = [0, 1, 2] * 4
    direct = LogisticRegression(max_iter=1000, random_state=5).fit(F.normalize(train).numpy(), labels)
    ours = head_predictions(logistic_head(train * 3.0, labels, seed=5), test * 0.5)
    assert ours == direct.predict(F.normalize(test).numpy()).tolist()


def test_pair_loss_equals_a_loop_over_pairs_and_dims():
    generator = torch.Generator().manual_seed(1)
    embeddings = {4: torch.randn(5, 4, generator=generator), 8: torch.randn(5, 8, generator=generator)}
    pairs = torch.tensor([[0, 1], [2, 3], [4, 0], [1, 1]])
    targets = torch.tensor([1.0, 0.0, 1.0, 1.0])
    expected = 0.0
    for values in embeddings.values():
        errors = [
            (F.cosine_similarity(values[a], values[b], dim=0) - t) ** 2
            for (a, b), t in zip(pairs.tolist(), targets.tolist(), strict=True)
        ]
        expected += sum(errors) / len(errors)
    expected /= len(embeddings)
    assert cosine_pair_loss(embeddings, pairs, targets).item() == pytest.approx(float(expected), rel=1e-6)


def test_weights_come_back_after_training_inside():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    model[2].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with weights_restored(model):
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        model(torch.randn(8, 3)).sum().backward()
        optimizer.step()
        assert not torch.equal(model[0].weight, before["0.weight"])
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # running stats too


class _Features(torch.nn.Module):
    """A 'model': a trainable linear map of fixed features (the data's embeddings)."""

    def __init__(self):
        super().__init__()
        self.projection = torch.nn.Linear(2, 4)
        with torch.no_grad():
            self.projection.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.1], [0.1, -0.2]]))
            self.projection.bias.zero_()

    def forward(self, features: torch.Tensor) -> dict[int, torch.Tensor]:
        values = self.projection(features)
        return {2: F.normalize(values[:, :2], dim=-1), 4: F.normalize(values, dim=-1)}


def _clusters(train_per_class=(6, 6, 6), test_per_class=5, model=None, noise=0.25):
    """Three classes around three directions in 2-D; class texts at the directions."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[1.0, 0.0], [-0.5, 0.87], [-0.5, -0.87]])
    model = model or _Features()

    def points(counts):
        labels = [c for c, count in enumerate(counts) for _ in range(count)]
        return centres[labels] + noise * torch.randn(len(labels), 2, generator=generator), labels

    train, train_labels = points(train_per_class)
    test, test_labels = points([test_per_class] * 3)
    return FewShotData(
        name="toy",
        train_labels=train_labels,
        test_labels=test_labels,
        class_names={c: f"class-{c}" for c in range(3)},
        embed_train=lambda positions: model(train[positions]),
        embed_test=lambda: model(test),
        embed_classes=lambda: model(centres),
    )


def test_n_shot_scores_match_a_direct_computation_and_leave_the_model_unchanged():
    model = _Features()
    data = _clusters(model=model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = FewShotSettings(shots=[0, 2, 4], draws=3, iterations=3, pair_batch_size=4, learning_rate=0.05)
    results = few_shot_scores(model, data, settings)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    assert sorted(results) == [0, 2, 4] and len(results[0]) == 1 and len(results[4]) == 3

    # Zero-shot: the nearest class direction, computed directly.
    with torch.no_grad():
        queries, classes = data.embed_test()[4], data.embed_classes()[4]
    nearest = (queries @ classes.T).argmax(dim=1).tolist()
    assert results[0][0][4]["accuracy"] == pytest.approx(
        sum(p == g for p, g in zip(nearest, data.test_labels, strict=True)) / len(nearest)
    )
    # Head only: draw k's scores equal a head fitted directly on that draw's embeddings.
    head_only = few_shot_scores(model, data, FewShotSettings(shots=[2], draws=2, contrastive=False))
    chosen = draw_examples(data.train_labels, [0, 1, 2], 2, seed=1)
    with torch.no_grad():
        train, test = data.embed_train(chosen)[2], data.embed_test()[2]
    labels = [data.train_labels[p] for p in chosen]
    direct = LogisticRegression(max_iter=1000, random_state=1).fit(F.normalize(train).numpy(), labels)
    predicted = direct.predict(F.normalize(test).numpy()).tolist()
    assert head_only[2][1][2]["macro_f1"] == pytest.approx(
        f1_score(data.test_labels, predicted, labels=[0, 1, 2], average="macro", zero_division=0)
    )


def test_summary_is_the_mean_and_spread_over_draws():
    results = {
        0: [{8: {"accuracy": 0.5, "macro_f1": 0.4, "weighted_f1": 0.45}}],
        2: [
            {8: {"accuracy": 0.6, "macro_f1": 0.5, "weighted_f1": 0.5}},
            {8: {"accuracy": 0.8, "macro_f1": 0.7, "weighted_f1": 0.9}},
        ],
    }
    flat = summary(results)
    assert flat["macro_f1/n2/d8"] == pytest.approx(0.6) and flat["macro_f1_std/n2/d8"] == pytest.approx(0.1)
    assert flat["accuracy/n0/d8"] == 0.5 and flat["accuracy_std/n0/d8"] == 0.0
    table = few_shot_table("toy", flat, "macro_f1")
    assert "0.600±0.100" in table and table.splitlines()[1].split() == ["shots", "d8"]
