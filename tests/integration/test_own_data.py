"""A demo recipe on data of the user's own naming: the best checkpoint follows the first eval set,
the demo's extras go with the demo's data, the instruction's languages are one key each, and a
refused run leaves no TensorBoard folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from demo_recipes import ROOT, quick_text_only

from cli import cli_main
from errors import ConfigError

LATE_FUSION = str(ROOT / "configs" / "demo" / "late_fusion.yaml")


def test_the_best_checkpoint_follows_the_first_eval_set_by_default(demo_dir, corpus_dir, tmp_path, caplog):
    """No monitor named: an eval set called fr2en is not refused, it is what the checkpoint monitors."""
    eval_set = corpus_dir / "eval" / "demo"
    eval_sets = f"--data.init_args.eval_sets={{fr2en: {eval_set}, en2fr: {eval_set}}}"
    with caplog.at_level("INFO", logger="callbacks.retrieval"):
        cli = cli_main(["fit", *quick_text_only(tmp_path, "--trainer.max_steps=2", eval_sets)])
    best = cli.trainer.checkpoint_callback
    assert best.monitor == "val/fr2en/ndcg@10/d256"
    assert "ModelCheckpoint.monitor: auto = val/fr2en/ndcg@10/d256" in caplog.text
    assert float(best.best_model_score) == float(cli.trainer.callback_metrics["val/fr2en/ndcg@10/d256"])
    assert Path(best.best_model_path) == tmp_path / "checkpoints" / "best-step=2.ckpt"


def test_the_demo_recipes_monitor_what_they_did(demo_dir, tmp_path):
    """`auto` stands for the tag the recipes named before: the demo's results do not move."""
    cli = cli_main(["fit", *quick_text_only(tmp_path, "--trainer.max_steps=1")])
    assert cli.trainer.checkpoint_callback.monitor == "val/demo/ndcg@10/d256"


def test_a_named_monitor_is_still_checked(demo_dir, corpus_dir, tmp_path):
    eval_sets = f"--data.init_args.eval_sets={{fr2en: {corpus_dir / 'eval' / 'demo'}}}"
    with pytest.raises(ConfigError, match="no eval set is named 'demo' \\(eval sets: \\['fr2en'\\]\\)"):
        cli_main(
            ["fit", *quick_text_only(tmp_path, eval_sets, "--best_checkpoint.monitor=val/demo/ndcg@10/d256")]
        )


def test_the_demos_keyword_and_intent_sets_go_with_its_eval_sets(demo_dir, speech_corpus_dir, tmp_path):
    demo = cli_main(["--config", LATE_FUSION, f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert sorted(demo.datamodule.hparams.classification_sets) == ["intents", "keywords"]

    # A copy of the demo's eval set, outside the demo's folder, stands for the user's.
    own = tmp_path / "fr2en"
    shutil.copytree(speech_corpus_dir / "eval" / "demo", own)
    mine = f"--data.init_args.eval_sets={{fr2en: {own}}}"
    user = cli_main(["--config", LATE_FUSION, f"--trainer.default_root_dir={tmp_path}", mine], run=False)
    assert user.datamodule.hparams.classification_sets is None
    # Named explicitly, a set is kept whatever the eval sets.
    keywords = f"--data.init_args.classification_sets={{kw: {demo_dir / 'speech-tasks' / 'keywords'}}}"
    chosen = cli_main(
        ["--config", LATE_FUSION, f"--trainer.default_root_dir={tmp_path}", mine, keywords], run=False
    )
    assert list(chosen.datamodule.hparams.classification_sets) == ["kw"]


def test_the_instructions_languages_are_one_key_each(demo_dir, tmp_path):
    languages = ["--data.init_args.prompts.query_language=French", "--data.prompts.document_language=English"]
    cli = cli_main(quick_text_only(tmp_path, *languages), run=False)
    assert (
        cli.datamodule.prompts.instruction(None)
        == "Given a French query, retrieve relevant English documents"
    )
    # The recipe's own template is kept beside the new languages.
    assert cli.datamodule.prompts.query_template == "Instruct: {instruction}\nQuery: {query}"


@pytest.mark.parametrize(
    "refusal, error",
    [
        ("--best_checkpoint.monitor=val/fr2en/ndcg@10/d256", "no eval set is named 'fr2en'"),
        ("--data.init_args.train_data=null", "data.train_data is not set"),
    ],
)
def test_a_refused_run_leaves_no_tensorboard_folder(demo_dir, tmp_path, refusal, error):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=error):
        cli_main(["fit", *quick_text_only(run, refusal)])
    assert not (run / "tensorboard").exists()
    assert not run.exists(), "the run folder, created by the refused run and left empty, goes too"


def test_a_refused_run_keeps_the_folders_of_earlier_runs(demo_dir, tmp_path):
    cli_main(["fit", *quick_text_only(tmp_path, "--trainer.max_steps=1")])
    first = sorted((tmp_path / "tensorboard").iterdir())
    assert [path.name for path in first] == ["version_0"]
    with pytest.raises(ConfigError):
        cli_main(["fit", *quick_text_only(tmp_path, "--best_checkpoint.monitor=val/nope/ndcg@10/d256")])
    assert sorted((tmp_path / "tensorboard").iterdir()) == first
    assert any((tmp_path / "tensorboard" / "version_0").iterdir())
