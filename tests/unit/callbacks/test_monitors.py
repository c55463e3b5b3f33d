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


def test_a_monitor_at_an_early_exit_names_an_exit_of_the_model():
    evaluator, kinds, dims = Evaluator(ks=(1, 10)), {"demo": "retrieval"}, [32, 256]
    assert unknown_monitor("val/demo/ndcg@10/L4/d256", evaluator, kinds, dims, exits=[2, 4]) is None
    assert unknown_monitor("val/demo/recall@1/L2/d32", evaluator, kinds, dims, exits=[2, 4]) is None
    # An exit the model does not have, or a model without exits: the message names its exits.
    problem = unknown_monitor("val/demo/ndcg@10/L3/d256", evaluator, kinds, dims, exits=[2, 4])
    assert problem.startswith("L3 is not an exit of this model (its early exits are [2, 4]")
    assert "it has no early exits" in unknown_monitor("val/demo/ndcg@10/L4/d256", evaluator, kinds, dims)
    # The rest of the tag is checked as at the full depth.
    assert "d512 is not one of the model's matryoshka_dims" in unknown_monitor(
        "val/demo/ndcg@10/L4/d512", evaluator, kinds, dims, exits=[4]
    )
    assert "cut-offs are ks=[1, 10]" in unknown_monitor(
        "val/demo/ndcg@5/L4/d256", evaluator, kinds, dims, exits=[4]
    )
    assert "no eval set is named 'dmeo'" in unknown_monitor(
        "val/dmeo/ndcg@10/L4/d256", evaluator, kinds, dims, exits=[4]
    )


def test_an_analysis_metric_at_an_exit_is_refused():
    """The analyses read the full depth only: their tags at an exit are never logged."""
    from callbacks.effective_rank import EffectiveRank

    evaluator = Evaluator(ks=(10,), analyses=[EffectiveRank()])
    kinds, dims = {"demo": "retrieval"}, [32, 256]
    tag = min(name for name in EffectiveRank().metric_names(dims) if name.endswith("/d256"))
    assert unknown_monitor(f"val/demo/{tag}", evaluator, kinds, dims, exits=[4]) is None
    layered = f"val/demo/{tag.rsplit('/', 1)[0]}/L4/d256"
    assert "scored at the full depth only" in unknown_monitor(layered, evaluator, kinds, dims, exits=[4])
