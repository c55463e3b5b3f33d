"""The demo's assets: a stage that takes minutes says so first, and the demo's extras follow its data."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from datamodules.demo import assets


@pytest.fixture
def empty_demo_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(assets.DEMO_DIR_ENV, str(tmp_path / "demo"))
    return tmp_path / "demo"


def test_training_the_text_stage_is_announced_before_it_starts(empty_demo_dir, monkeypatch, caplog):
    """What it does, why, how long, how to skip it; the child's own output (its progress bar)
    passes through to the terminal."""
    monkeypatch.setattr(assets, "text_model_dir", lambda: empty_demo_dir / "tiny-qwen3")
    children = []

    def child(command, **options):
        announced = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        children.append((command, options, announced))
        (root,) = [arg for arg in command if arg.startswith("--trainer.default_root_dir=")]
        run_dir = Path(root.split("=", 1)[1])
        (run_dir / "text_encoder").mkdir(parents=True)
        (run_dir / "tensorboard").mkdir()

    monkeypatch.setattr(assets.subprocess, "run", child)
    with caplog.at_level(logging.INFO, logger="datamodules.demo.assets"):
        path = assets.text_stage_dir()
    assert path == empty_demo_dir / "text-stage" / "text_encoder" and path.is_dir()
    ((command, options, announced),) = children
    assert command[2:5] == ["fit", "--config", str(assets.TEXT_STAGE_RECIPE)]
    # Nothing captured: the child's progress bar and validation lines reach the terminal; where
    # the output is not one (as under pytest), a line every 50 steps stands for the bar.
    assert not {"stdout", "stderr", "capture_output"} & set(options)
    assert "--trainer.callbacks+=callbacks.progress_lines.ProgressLines" in command
    (announcement,) = announced
    assert "text-only demo stage, not trained yet" in announcement
    assert " ".join(command) in announcement
    assert "450 steps: about 2 minutes" in announcement and "progress bar" in announcement
    assert "--model.init_args.text_encoder.pretrained_model_name_or_path=PATH" in announcement
    assert "The text-only demo stage is trained" in caplog.text

    children.clear()
    assets.text_stage_dir()  # built: no second run, no announcement
    assert children == []


def test_an_asr_fit_that_exported_nothing_leaves_no_asset(empty_demo_dir, monkeypatch):
    """A preempted child fit exports no recognizer: the demo asset is not published half-built."""
    for built_first in ("speech_corpus_dir", "speech_model_dir", "text_model_dir"):
        monkeypatch.setattr(assets, built_first, lambda: empty_demo_dir)

    def preempted_child(command, **options):
        (root,) = [arg for arg in command if arg.startswith("--trainer.default_root_dir=")]
        (Path(root.split("=", 1)[1]) / "tensorboard").mkdir(parents=True)  # ran, then stopped

    monkeypatch.setattr(assets.subprocess, "run", preempted_child)
    with pytest.raises(RuntimeError, match="exported nothing"):
        assets.asr_model_dir()
    assert not (empty_demo_dir / "asr-ctc").exists()


def test_the_demos_classification_sets_follow_its_eval_sets(demo_dir, speech_corpus_dir, tmp_path, caplog):
    demos = assets.demo_classification_sets({"demo": str(speech_corpus_dir / "eval" / "demo")})
    tasks = assets.speech_tasks_dir()
    assert demos == {"keywords": str(tasks / "keywords"), "intents": str(tasks / "intents")}
    with caplog.at_level(logging.INFO, logger="datamodules.demo.assets"):
        mine = {"demo": str(speech_corpus_dir / "eval" / "demo"), "fr2en": str(tmp_path / "fr2en")}
        assert assets.demo_classification_sets(mine) is None
        assert assets.demo_classification_sets(None) is None
    assert "data.classification_sets: none" in caplog.text and "['demo', 'fr2en']" in caplog.text
    assert "--data.init_args.classification_sets=" in caplog.text
