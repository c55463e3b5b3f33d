"""The demo's assets: the demo's extras follow its data."""

from __future__ import annotations

import logging

from datamodules.demo import assets


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
