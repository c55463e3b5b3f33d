"""``best_checkpoint.monitor: auto``: the tag it stands for, from the run's eval sets and dims."""

from __future__ import annotations

from callbacks.evaluation import Evaluator
from callbacks.monitors import automatic_monitor, unknown_monitor


def test_auto_names_the_first_retrieval_set_at_the_largest_dim():
    evaluator = Evaluator(ks=(5, 10))
    kinds = {"keywords": "classification", "fr2en": "retrieval", "wo2fr": "retrieval"}
    monitor = automatic_monitor(evaluator, kinds, [32, 64, 256])
    assert monitor == "val/fr2en/ndcg@10/d256"
    assert unknown_monitor(monitor, evaluator, kinds, [32, 64, 256]) is None


def test_auto_with_classification_sets_only_takes_the_first_ones_accuracy():
    kinds = {"intents": "classification", "keywords": "classification"}
    assert automatic_monitor(Evaluator(ks=(1, 20)), kinds, [128]) == "val/intents/accuracy/d128"


def test_auto_without_eval_sets_names_nothing():
    assert automatic_monitor(Evaluator(), {}, [32, 64]) is None
