"""n-shot classification and prompt x task through the CLI, after `validate` of a trained checkpoint."""

from __future__ import annotations

import hashlib
import json

import pytest
from demo_recipes import quick_text_only

from cli import cli_main
from datamodules.demo import assets
from errors import ConfigError, DataError


@pytest.fixture(scope="module")
def trained(demo_dir, tmp_path_factory):
    """A 4-step text-only checkpoint and the demo's intent set (queries as written text)."""
    root = tmp_path_factory.mktemp("task-evaluations")
    cli_main(["fit", *quick_text_only(root)])
    return root, str(assets.speech_tasks_dir() / "intents")


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (version,) = sorted((run_dir / "tensorboard").glob("version_*"))[-1:]
    accumulator = EventAccumulator(str(version), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    scalars = {tag: accumulator.Scalars(tag)[-1].value for tag in accumulator.Tags()["scalars"]}
    return scalars, accumulator.Tags()["images"], version


def _validate(root, intents, *extra):
    return cli_main(
        [
            "validate",
            *quick_text_only(root),
            f"--data.init_args.classification_sets={{intents: {intents}}}",
            f"--ckpt_path={root / 'checkpoints' / 'last.ckpt'}",
            *extra,
        ]
    )


def test_n_shot_and_prompt_x_task_after_validate_leave_the_checkpoint_as_it_was(trained):
    root, intents = trained
    checkpoint = root / "checkpoints" / "last.ckpt"
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    cli = _validate(
        root,
        intents,
        "--few_shot.shots=[0, 1, 2]",
        "--few_shot.draws=2",
        "--few_shot.iterations=1",
        "--prompt_matrix.tasks=all",
    )
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == digest

    scalars, images, version = _scalars(root)
    record = json.loads((version / "few_shot" / "intents.json").read_text())
    assert sorted(record["draws"]) == ["0", "1", "2"] and len(record["draws"]["2"]) == 2
    for tag, value in record["summary"].items():
        assert scalars[f"val/intents/few_shot/{tag}"] == pytest.approx(value)
    # Zero-shot is what validation scores on the set: the nearest class text.
    assert record["summary"]["accuracy/n0/d256"] == pytest.approx(scalars["val/intents/accuracy/d256"])
    assert record["summary"]["macro_f1/n0/d256"] == pytest.approx(scalars["val/intents/macro_f1/d256"])
    assert {
        "val/intents/few_shot_macro_f1_vs_n",
        "val/intents/few_shot_weighted_f1_vs_n",
        "val/prompt_x_task",
    } <= set(images)

    # Prompt x task: each set under its own prompt is what validation scored (a second code path).
    matrix = json.loads((version / "prompt_matrix.json").read_text())
    own = matrix["own_task"]
    assert set(matrix["matrix"]["demo"]) == set(cli.datamodule.prompts.prompts)
    assert matrix["matrix"]["demo"][own["demo"]] == pytest.approx(scalars["val/demo/ndcg@10/d256"])
    assert matrix["matrix"]["intents"][own["intents"]] == pytest.approx(scalars["val/intents/accuracy/d256"])
    for task, value in matrix["matrix"]["demo"].items():
        assert scalars[f"val/demo/prompt/{task}/ndcg@10/d256"] == pytest.approx(value)


def test_a_class_with_fewer_examples_than_n_is_named_before_the_evaluation(trained):
    root, intents = trained
    with pytest.raises(DataError, match=r"17-shot needs 17 train examples per class.*'class-0': 16"):
        _validate(root, intents, "--few_shot.shots=[1, 17]")


def test_an_unknown_prompt_name_is_named_at_start_up(trained):
    root, intents = trained
    with pytest.raises(ConfigError, match=r"prompt_matrix.tasks names \['summarize'\].*known"):
        _validate(root, intents, "--prompt_matrix.tasks=[document_retrieval, summarize]")
