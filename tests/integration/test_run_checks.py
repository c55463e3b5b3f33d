"""What a run tells its user early: a checkpoint monitor no validation logs is refused when fit
starts (not hours in), and warnings name a selection on the test judgments, a run without eval
sets, gradient accumulation taken for a larger batch, and an eval set with nothing to score."""

from __future__ import annotations

import logging

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from trainers import quiet_cpu_trainer

from callbacks.retrieval import RetrievalEvaluator
from datamodules.pairs import StreamingPairDataModule
from errors import ConfigError
from lightning_modules import TextOnly
from lightning_modules.components.text_encoder import TextEncoderConfig


class CountSteps(Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, *args):
        self.steps += 1


def _fit(
    tmp_path, text_model, corpus_dir, monitor: str, eval_sets=True, val_split=None, **trainer_options
) -> CountSteps:
    model = TextOnly(
        TextEncoderConfig(str(text_model)),
        matryoshka_dims=[32, 256],
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
    )
    data = StreamingPairDataModule(
        str(text_model),
        train_data=str(corpus_dir / "train.jsonl"),
        eval_sets={"demo": str(corpus_dir / "eval" / "demo")} if eval_sets else None,
        val_split=val_split,
        batch_size=4,
        max_query_length=32,
        max_document_length=48,
    )
    steps = CountSteps()
    trainer = quiet_cpu_trainer(
        max_steps=1,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        callbacks=[RetrievalEvaluator(ks=(5, 10)), ModelCheckpoint(tmp_path, monitor=monitor), steps],
        **({"limit_val_batches": 0} | trainer_options),
    )
    trainer.fit(model, data)
    return steps


@pytest.mark.parametrize(
    "monitor, says",
    [
        ("val/kallaama/ndcg@10/d256", "no eval set is named 'kallaama' (eval sets: ['demo'])"),
        ("val/demo/ndcg@10/d1024", "d1024 is not one of the model's matryoshka_dims [32, 256]"),
        ("val/demo/recall@20/d256", "cut-offs are ks=[5, 10]"),
        ("val/demo/ndcg@10", "logs ndcg@10 once per dim: add /d<dim>, e.g. val/demo/ndcg@10/d256"),
        ("val/demo/nDCG@10/d256", "logs no 'nDCG@10/d256'. Did you mean val/demo/ndcg@10/d256"),
        ("val/demo/accuracy/d256", "eval set 'demo' (retrieval) logs no 'accuracy/d256'"),
    ],
    ids=["eval set", "dim", "cut-off", "no dim", "misspelt", "other kind's metric"],
)
def test_a_monitor_no_validation_logs_fails_before_the_first_step(
    tmp_path, tiny_text_model, corpus_dir, monitor, says
):
    with pytest.raises(ConfigError, match="ModelCheckpoint.monitor") as error:
        _fit(tmp_path, tiny_text_model, corpus_dir, monitor)
    assert says in str(error.value)


def test_a_monitor_the_evaluator_logs_passes(tmp_path, tiny_text_model, corpus_dir):
    # The tag a real validation logs (the demo recipes monitor it), and a tag of another stage.
    assert _fit(tmp_path, tiny_text_model, corpus_dir, "val/demo/ndcg@10/d256").steps == 1
    assert _fit(tmp_path, tiny_text_model, corpus_dir, "train/loss").steps == 1


def test_analyses_metrics_are_checked_when_declared_and_trusted_when_not():
    from types import SimpleNamespace

    from callbacks.analysis import EmbeddingAnalysis
    from callbacks.cost import CostPerDimension
    from callbacks.effective_rank import EffectiveRank

    eval_sets = {"demo": SimpleNamespace(kind="retrieval"), "intents": SimpleNamespace(kind="classification")}
    evaluator = RetrievalEvaluator(ks=(10,), analyses=[EffectiveRank(), CostPerDimension()])
    for logged in (
        "val/demo/documents_entropy_rank/d256",
        "val/demo/queries_components@90/d32",
        "val/demo/queries_samples",
        "val/intents/query_ms_float16/d256",
        "val/intents/macro_f1/d32",
        "val/demo/num_queries_evaluated",
    ):
        assert evaluator.unknown_monitor(logged, eval_sets, [32, 256]) is None, logged
    embeddings = {side: {d: torch.randn(8, d) for d in (32, 256)} for side in ("queries", "corpus")}
    for analysis in evaluator.analyses:  # the declared names are exactly what analyze returns
        assert set(analysis.analyze(SimpleNamespace(name="demo"), embeddings)) == analysis.metric_names(
            [32, 256]
        )
    problem = evaluator.unknown_monitor("val/demo/documents_entropy_rnak/d256", eval_sets, [32, 256])
    assert "Did you mean val/demo/documents_entropy_rank/d256" in problem
    assert "logs no 'ndcg@10/d32'" in evaluator.unknown_monitor(
        "val/intents/ndcg@10/d32", eval_sets, [32, 256]
    )

    class Undeclared(EmbeddingAnalysis):  # a user's analysis that does not list its names
        def analyze(self, eval_set, embeddings):
            return {"my_score/d32": 1.0}

    trusting = RetrievalEvaluator(ks=(10,), analyses=[Undeclared()])
    assert trusting.unknown_monitor("val/demo/my_score/d32", eval_sets, [32, 256]) is None
    # ... but a misspelt metric of the evaluator's own is still refused beside it.
    problem = trusting.unknown_monitor("val/demo/nDCG@10/d256", eval_sets, [32, 256])
    assert "Did you mean val/demo/ndcg@10/d256" in problem
    assert "logs no 'ndgc@10/d32'" in trusting.unknown_monitor("val/demo/ndgc@10/d32", eval_sets, [32, 256])


def test_without_eval_sets_a_warning_says_no_checkpoint_is_written(
    tmp_path, tiny_text_model, corpus_dir, caplog
):
    recipes = {"check_val_every_n_epoch": None, "val_check_interval": 1}  # validation by steps only
    with caplog.at_level(logging.WARNING, logger="callbacks.retrieval"):
        _fit(tmp_path, tiny_text_model, corpus_dir, "train/loss", eval_sets=False, **recipes)
    assert "No eval sets" in caplog.text and "write nothing" in caplog.text
    assert not list(tmp_path.glob("*.ckpt"))  # monitor train/loss is logged, yet nothing was saved


def test_selecting_checkpoints_on_the_test_judgments_is_said_unless_chosen(
    tmp_path, tiny_text_model, corpus_dir, caplog
):
    with caplog.at_level(logging.WARNING, logger="callbacks.retrieval"):
        _fit(tmp_path, tiny_text_model, corpus_dir, "val/demo/ndcg@10/d256")
    assert "overstates its test scores" in caplog.text and "data.val_split" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="callbacks.retrieval"):
        _fit(tmp_path, tiny_text_model, corpus_dir, "val/demo/ndcg@10/d256", val_split="test")  # intended
        _fit(tmp_path, tiny_text_model, corpus_dir, "train/loss")  # nothing selected on validation
    assert "overstates" not in caplog.text


def test_gradient_accumulation_is_not_taken_for_a_larger_contrastive_batch(
    tmp_path, tiny_text_model, corpus_dir, caplog
):
    with caplog.at_level(logging.WARNING, logger="lightning_modules.base"):
        _fit(tmp_path, tiny_text_model, corpus_dir, "train/loss", accumulate_grad_batches=2)
    assert "accumulate_grad_batches=2" in caplog.text and "GradCache" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lightning_modules.base"):
        _fit(tmp_path, tiny_text_model, corpus_dir, "train/loss")
    assert "accumulate_grad_batches" not in caplog.text


def test_an_eval_set_without_queries_says_so_instead_of_blaming_limit_batches(
    tmp_path, tiny_text_model, corpus_dir, caplog
):
    import shutil

    folder = tmp_path / "empty"
    shutil.copytree(corpus_dir / "eval" / "demo", folder)
    (folder / "queries.jsonl").write_text("")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n")
    model = TextOnly(TextEncoderConfig(str(tiny_text_model)), matryoshka_dims=[32, 256])
    data = StreamingPairDataModule(
        str(tiny_text_model), eval_sets={"empty": str(folder)}, max_document_length=48
    )
    trainer = Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[RetrievalEvaluator()]
    )
    with caplog.at_level(logging.WARNING, logger="callbacks.retrieval"):
        trainer.validate(model, data)
    assert "eval set empty has no usable queries" in caplog.text and "limit_" not in caplog.text


def test_score_table_puts_metrics_in_rows_and_dims_in_columns():
    from callbacks.score_table import headline, score_table

    scores = {"ndcg@10/d32": 0.5, "ndcg@10/d256": 0.75, "recall@10/d32": 0.25, "recall@10/d256": 1.0}
    assert score_table("test demo", scores).splitlines() == [
        "test demo        d32     d256",
        "  ndcg@10     0.5000   0.7500",
        "  recall@10   0.2500   1.0000",
    ]
    assert headline("val at step 5, demo", "ndcg@10", {256: 0.75, 32: 0.5}) == (
        "val at step 5, demo ndcg@10: d32 0.500 | d256 0.750"
    )


def test_the_terminal_shows_the_scores_tensorboard_gets(tmp_path, tiny_text_model, corpus_dir, caplog):
    """validate prints a table per eval set; fit a line per eval set at every validation."""
    model = TextOnly(TextEncoderConfig(str(tiny_text_model)), matryoshka_dims=[32, 256])
    data = StreamingPairDataModule(
        str(tiny_text_model), eval_sets={"demo": str(corpus_dir / "eval" / "demo")}, max_document_length=48
    )
    evaluator = RetrievalEvaluator(ks=(5, 10))
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[evaluator])
    with caplog.at_level(logging.INFO, logger="callbacks.retrieval"):
        (results,) = trainer.validate(model, data, verbose=False)  # one dataloader: one result dict
    (table,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("\nval demo")]
    rows = {line.split()[0]: line.split()[1:] for line in table.strip().splitlines()[1:]}
    assert list(rows) == [f"{m}@{k}" for m in ("ndcg", "recall", "mrr") for k in (5, 10)]
    for metric, cells in rows.items():
        assert cells == [f"{results[f'val/demo/{metric}/d{dim}']:.4f}" for dim in (32, 256)]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="callbacks.retrieval"):
        _fit(
            tmp_path, tiny_text_model, corpus_dir, "train/loss", val_check_interval=1, limit_val_batches=None
        )
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("val at step 1, demo")]
    assert line.startswith("val at step 1, demo ndcg@10: d32 ") and " | d256 " in line
