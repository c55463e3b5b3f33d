"""n-shot classification of queries with any trained model, after SetFit (Tunstall et al. 2022).

For each n and each seeded draw of n labelled examples per class from a classification set's
``train`` split, the set's evaluated split (``test`` in the demo) is classified:
- stage 1 (``contrastive``): the model's trainable part is fine-tuned on pairs of the n x classes
  examples, SetFit's way: per iteration, every example is paired once with another example of its
  class (label 1) and once with an example of another class (label 0), and the loss is SetFit's
  ``CosineSimilarityLoss``, the squared error between a pair's cosine and its label, here averaged
  over the Matryoshka dims so every prefix is tuned. It trains the model in memory and restores its
  weights afterwards: every draw starts from the trained model, and no checkpoint is written;
- stage 2: a scikit-learn ``LogisticRegression`` per dim, fitted on the (tuned) embeddings of the
  drawn examples, predicts each evaluated query's class.
n = 0 is zero-shot: each query takes its nearest class text, as validation scores the set.

Three scores per (n, dim), as mean and standard deviation over the draws: ``accuracy``,
``macro_f1`` (every class weighs the same; the validation tables' F1) and ``weighted_f1``
(classes weighed by their number of evaluated queries: ``f1_score(average="weighted")``, what
the reference paper's intent-detection code reports).
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

from callbacks.metrics import top_k_search
from errors import ConfigError, DataError

log = logging.getLogger(__name__)

Embeddings = dict[int, torch.Tensor]
SCORES = ("accuracy", "macro_f1", "weighted_f1")


@dataclass
class FewShotSettings:
    """What n-shot classification draws and how stage 1 trains."""

    shots: Sequence[int] = (0, 1, 2, 4, 8, 16)
    """Examples per class; 0 is zero-shot (the nearest class text)."""
    draws: int = 5
    """Seeded draws of the examples per n > 0; scores are the mean and spread over them."""
    seed: int = 0
    """Seed of the draws, the pairs and the heads (draw k of every n uses seed + k)."""
    contrastive: bool = True
    """Stage 1 on (SetFit); False: the logistic-regression head alone on the model's embeddings."""
    iterations: int = 20
    """SetFit's num_iterations: pairs per example = 2 x iterations (one positive, one negative each)."""
    epochs: int = 1
    """Passes over the pairs in stage 1."""
    pair_batch_size: int = 16
    """Pairs per stage-1 step (their distinct examples are embedded once per step)."""
    learning_rate: float = 1e-4
    """AdamW learning rate of stage 1 over the model's trainable parameters."""

    def __post_init__(self):
        shots = list(self.shots)
        if not shots or any(not isinstance(n, int) or n < 0 for n in shots):
            raise ConfigError(f"few_shot.shots must be non-negative integers, got {self.shots!r}.")
        if self.draws < 1 or self.iterations < 1 or self.epochs < 1 or self.pair_batch_size < 1:
            raise ConfigError(
                "few_shot.draws, .iterations, .epochs and .pair_batch_size must be >= 1, got "
                f"{self.draws}, {self.iterations}, {self.epochs}, {self.pair_batch_size}."
            )
        self.shots = sorted(set(shots))


# ----- drawing and pairing -------------------------------------------------------------------
def examples_by_class(labels: Sequence[int]) -> dict[int, list[int]]:
    by_class: dict[int, list[int]] = defaultdict(list)
    for position, label in enumerate(labels):
        by_class[label].append(position)
    return dict(by_class)


def check_enough_examples(
    labels: Sequence[int], classes: Sequence[int], n: int, names: Mapping[int, str], where: str
) -> None:
    """Refuses an n that a class of ``classes`` has fewer train examples for, naming the classes."""
    by_class = examples_by_class(labels)
    short = {names[c]: len(by_class.get(c, [])) for c in classes if len(by_class.get(c, [])) < n}
    if short:
        raise DataError(
            f"{where}: {n}-shot needs {n} train examples per class; these classes have fewer "
            f"(class: examples): {short}. Lower few_shot.shots or add examples."
        )


def draw_examples(labels: Sequence[int], classes: Sequence[int], n: int, seed: int) -> list[int]:
    """n positions per class of ``classes`` (sorted by class, then position), drawn with ``seed``."""
    rng = random.Random(seed)
    by_class = examples_by_class(labels)
    return [position for c in sorted(classes) for position in sorted(rng.sample(by_class[c], n))]


def contrastive_pairs(labels: Sequence[int], iterations: int, seed: int) -> list[tuple[int, int, float]]:
    """SetFit's pairs over positions 0..len(labels)-1: per iteration and example, one with another
    example of its class (1.0; itself when it is its class's only one) and one with an example of
    another class (0.0, when there is one); shuffled."""
    rng = random.Random(seed)
    by_class = examples_by_class(labels)
    pairs = []
    for _ in range(iterations):
        for position, label in enumerate(labels):
            same = [other for other in by_class[label] if other != position] or [position]
            pairs.append((position, rng.choice(same), 1.0))
            different = [other for other, value in enumerate(labels) if value != label]
            if different:
                pairs.append((position, rng.choice(different), 0.0))
    rng.shuffle(pairs)
    return pairs


# ----- stage 1: contrastive fine-tuning on the pairs --------------------------------------------
def cosine_pair_loss(embeddings: Embeddings, pairs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """SetFit's CosineSimilarityLoss, mean over dims: ``mean((cos(u, v) - label)^2)``.

    pairs: ``[P, 2]`` row positions into each ``embeddings[dim]``; targets: ``[P]`` labels.
    """
    losses = []
    for values in embeddings.values():
        unit = F.normalize(values.float(), dim=-1)
        cosine = (unit[pairs[:, 0]] * unit[pairs[:, 1]]).sum(dim=-1)
        losses.append(F.mse_loss(cosine, targets))
    return torch.stack(losses).mean()


@contextmanager
def weights_restored(module: torch.nn.Module) -> Iterator[None]:
    """Whatever trains inside, the module leaves with the trainable weights and buffers it came in
    with (frozen parameters are not copied: they cannot change)."""
    state = module.state_dict(keep_vars=True)
    saved = {
        key: value.detach().clone()
        for key, value in state.items()
        if not (isinstance(value, torch.nn.Parameter) and not value.requires_grad)
    }
    training = module.training
    try:
        yield
    finally:
        with torch.no_grad():
            for key, value in saved.items():
                state[key].copy_(value)
        module.train(training)


def fine_tune_on_pairs(
    module: torch.nn.Module,
    embed: Callable[[list[int]], Embeddings],
    pairs: Sequence[tuple[int, int, float]],
    settings: FewShotSettings,
) -> list[float]:
    """Stage 1: AdamW on the module's trainable parameters; ``embed(positions)`` embeds examples
    with gradients. Returns the loss of every step."""
    parameters = [p for p in module.parameters() if p.requires_grad]
    if not parameters:
        raise ConfigError(
            f"few_shot.contrastive: {type(module).__name__} has no trainable parameters to tune; "
            "set few_shot.contrastive=false (the head alone)."
        )
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate)
    module.train()
    losses = []
    with torch.enable_grad():
        for _ in range(settings.epochs):
            for start in range(0, len(pairs), settings.pair_batch_size):
                chunk = pairs[start : start + settings.pair_batch_size]
                positions = sorted({p for a, b, _ in chunk for p in (a, b)})
                row = {position: k for k, position in enumerate(positions)}
                index = torch.tensor([[row[a], row[b]] for a, b, _ in chunk])
                targets = torch.tensor([label for *_, label in chunk])
                embeddings = embed(positions)
                device = next(iter(embeddings.values())).device
                loss = cosine_pair_loss(embeddings, index.to(device), targets.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
    module.eval()
    return losses


# ----- stage 2: the head, and the scores ---------------------------------------------------------
def prediction_scores(
    predicted: Sequence[int], gold: Sequence[int], classes: Sequence[int]
) -> dict[str, float]:
    """Accuracy, macro F1 and weighted F1 over ``classes`` (a class never predicted counts with F1 0)."""
    predicted, gold = list(predicted), list(gold)
    return {
        "accuracy": float(accuracy_score(gold, predicted)),
        "macro_f1": float(f1_score(gold, predicted, labels=list(classes), average="macro", zero_division=0)),
        "weighted_f1": float(
            f1_score(gold, predicted, labels=list(classes), average="weighted", zero_division=0)
        ),
    }


def logistic_head(train: torch.Tensor, labels: Sequence[int], seed: int) -> LogisticRegression:
    """SetFit's default head: scikit-learn's logistic regression on unit-length embeddings."""
    head = LogisticRegression(max_iter=1000, random_state=seed)
    return head.fit(F.normalize(train.float(), dim=-1).numpy(), list(labels))


def head_predictions(head: LogisticRegression, test: torch.Tensor) -> list[int]:
    return head.predict(F.normalize(test.float(), dim=-1).numpy()).tolist()


def zero_shot_predictions(queries: torch.Tensor, classes: torch.Tensor) -> list[int]:
    """Each query's nearest class text (row of ``classes``), as validation classifies."""
    _, nearest = top_k_search(queries.float(), classes.float(), 1, 1024, 16384)
    return nearest[:, 0].tolist()


# ----- the evaluation --------------------------------------------------------------------------
@dataclass
class FewShotData:
    """One classification set, as n-shot needs it (positions index the ``embed_*`` callables)."""

    name: str
    train_labels: list[int]
    """Class of each train-split example."""
    test_labels: list[int]
    """Class of each evaluated query."""
    class_names: dict[int, str]
    """Class -> its id in the corpus (named in errors)."""
    embed_train: Callable[[list[int]], Embeddings]
    """Train examples at these positions -> embeddings (with gradients under enable_grad)."""
    embed_test: Callable[[], Embeddings]
    """Every evaluated query -> embeddings."""
    embed_classes: Callable[[], Embeddings]
    """Every class text -> embeddings (zero-shot)."""

    @property
    def classes(self) -> list[int]:
        return sorted(set(self.test_labels))


def check_shots(data: FewShotData, settings: FewShotSettings) -> None:
    for n in settings.shots:
        if n:
            check_enough_examples(
                data.train_labels, data.classes, n, data.class_names, f"classification set {data.name!r}"
            )


def few_shot_scores(
    module: torch.nn.Module, data: FewShotData, settings: FewShotSettings
) -> dict[int, list[dict[int, dict[str, float]]]]:
    """``{n: [per draw: {dim: {score: value}}]}`` (one draw for n = 0). The module's weights are
    the same afterwards (stage 1 trains in memory and is undone)."""
    check_shots(data, settings)
    module.eval()
    results: dict[int, list[dict[int, dict[str, float]]]] = {}
    with torch.no_grad():
        untuned_test = {dim: value.cpu() for dim, value in data.embed_test().items()}
        if 0 in settings.shots:
            classes = data.embed_classes()
            results[0] = [
                {
                    dim: prediction_scores(
                        zero_shot_predictions(untuned_test[dim], classes[dim].cpu()),
                        data.test_labels,
                        data.classes,
                    )
                    for dim in sorted(untuned_test)
                }
            ]
    for n in (n for n in settings.shots if n):
        results[n] = []
        for draw in range(settings.draws):
            started, seed = time.perf_counter(), settings.seed + draw
            chosen = draw_examples(data.train_labels, data.classes, n, seed)
            labels = [data.train_labels[p] for p in chosen]
            with weights_restored(module):
                if settings.contrastive:
                    pairs = contrastive_pairs(labels, settings.iterations, seed)

                    def embed_drawn(rows: list[int], chosen=chosen) -> Embeddings:
                        return data.embed_train([chosen[r] for r in rows])

                    fine_tune_on_pairs(module, embed_drawn, pairs, settings)
                    with torch.no_grad():
                        test = {dim: value.cpu() for dim, value in data.embed_test().items()}
                else:
                    test = untuned_test
                with torch.no_grad():
                    train = {dim: value.cpu() for dim, value in data.embed_train(chosen).items()}
            scores = {}
            for dim in sorted(train):
                head = logistic_head(train[dim], labels, seed)
                scores[dim] = prediction_scores(
                    head_predictions(head, test[dim]), data.test_labels, data.classes
                )
            results[n].append(scores)
            top = max(scores)
            log.info(
                "few_shot %s: n=%d, draw %d/%d: macro F1 at d%d %.3f (%.0f s)",
                data.name,
                n,
                draw + 1,
                settings.draws,
                top,
                scores[top]["macro_f1"],
                time.perf_counter() - started,
            )
    return results


def summary(results: Mapping[int, Sequence[Mapping[int, Mapping[str, float]]]]) -> dict[str, float]:
    """Flat tags ``<score>/n<n>/d<dim>`` (mean over draws) and ``<score>_std/n<n>/d<dim>``
    (population standard deviation; 0 for one draw)."""
    flat = {}
    for n, draws in results.items():
        for dim in draws[0]:
            for score in SCORES:
                values = np.array([draw[dim][score] for draw in draws])
                flat[f"{score}/n{n}/d{dim}"] = float(values.mean())
                flat[f"{score}_std/n{n}/d{dim}"] = float(values.std())
    return flat


def few_shot_table(title: str, flat: Mapping[str, float], score: str) -> str:
    """Rows n, columns dims: ``mean ± std`` of one score."""
    cells: dict[int, dict[int, str]] = defaultdict(dict)
    for tag, value in flat.items():
        name, n, dim = tag.split("/")
        if name == score:
            spread = flat[f"{score}_std/{n}/{dim}"]
            cells[int(n[1:])][int(dim[1:])] = f"{value:.3f}±{spread:.3f}"
    dims = sorted({dim for row in cells.values() for dim in row})
    lines = [
        f"{title} ({score}, mean±std over draws)",
        "shots" + "".join(f"{'d' + str(d):>14}" for d in dims),
    ]
    for n in sorted(cells):
        lines.append(f"{n:>5}" + "".join(f"{cells[n].get(d, ''):>14}" for d in dims))
    return "\n".join(lines)


def score_vs_shots_figure(flat: Mapping[str, float], score: str, title: str):
    """One line per dim: the score against n (log-spaced axis with 0 placed first), spread as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[int, dict[int, tuple[float, float]]] = defaultdict(dict)
    for tag, value in flat.items():
        name, n, dim = tag.split("/")
        if name == score:
            series[int(dim[1:])][int(n[1:])] = (value, flat[f"{score}_std/{n}/{dim}"])
    figure, axes = plt.subplots(figsize=(6, 4))
    for dim in sorted(series):
        shots = sorted(series[dim])
        positions = list(range(len(shots)))
        means = [series[dim][n][0] for n in shots]
        spreads = [series[dim][n][1] for n in shots]
        axes.errorbar(positions, means, yerr=spreads, marker="o", capsize=3, label=f"d{dim}")
        axes.set_xticks(positions, [str(n) for n in shots])
    axes.set_xlabel("examples per class (n)")
    axes.set_ylabel(score)
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    return figure
