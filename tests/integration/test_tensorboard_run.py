"""One TensorBoard run per training run: a resumed fit draws on in its run's folder, at the steps
the terminal prints, each step once (the CLI on the text-only demo recipe, event files read back
the way TensorBoard reads them)."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from demo_recipes import quick_text_only
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from trainers import PreemptAt

from callbacks.tensorboard_run import CHECKPOINT_KEY, continue_tensorboard_run
from cli import cli_main

MAX_STEPS = 6
VALIDATED = [2, 4, 6]  # val_check_interval 2
NDCG = "val/demo/ndcg@10/d256"


@pytest.fixture(scope="module")
def small_eval_set(tmp_path_factory, corpus_dir):
    """8 queries and 16 documents of the demo eval set: a validation in well under a second."""
    folder = tmp_path_factory.mktemp("small-eval")
    source = corpus_dir / "eval" / "demo"
    (folder / "qrels").mkdir()
    for name, rows in (("queries.jsonl", 8), ("corpus.jsonl", 16), ("qrels/test.tsv", 9)):  # + header
        (folder / name).write_text("\n".join((source / name).read_text().splitlines()[:rows]) + "\n")
    return folder


def _recipe(root, eval_set, *extra: str) -> list[str]:
    return quick_text_only(
        root,
        f"--trainer.max_steps={MAX_STEPS}",
        "--trainer.log_every_n_steps=1",
        f"--data.init_args.eval_sets={json.dumps({'demo': str(eval_set)})}",
        *extra,
    )


def _scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag's (step, value) points, as TensorBoard reads the folder (files in order,
    a restart's purge applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in tags}


def _terminal_validation_steps(caplog) -> list[int]:
    """The steps of the "val at step N, demo ..." lines the runs printed."""
    lines = [record.getMessage() for record in caplog.records]
    return [int(match[1]) for line in lines if (match := re.match(r"val at step (\d+), demo ", line))]


def _assert_one_curve_per_tag(scalars: dict) -> None:
    for tag, points in scalars.items():
        steps = [step for step, _ in points]
        assert steps == sorted(set(steps)), f"{tag}: steps {steps} repeat or go back"


def test_a_resumed_fit_draws_on_in_one_folder_from_the_checkpoints_step(
    demo_dir, tmp_path, small_eval_set, caplog
):
    """A run killed after its step-3 checkpoint had drawn steps 4-5; resumed from that checkpoint,
    the same folder holds each step once, the resumed run's points replacing the killed run's."""
    first = cli_main(_recipe(tmp_path, small_eval_set, "--trainer.max_steps=5"), run=False)
    first.trainer.callbacks.append(ModelCheckpoint(tmp_path / "every", every_n_train_steps=3, save_top_k=-1))
    with caplog.at_level(logging.INFO, logger="callbacks.retrieval"):
        first.trainer.fit(first.model, datamodule=first.datamodule)
        printed_first = _terminal_validation_steps(caplog)
        caplog.clear()
        checkpoint = tmp_path / "every" / "epoch=0-step=3.ckpt"  # named by the optimizer step, as before
        resumed = cli_main(["fit", *_recipe(tmp_path, small_eval_set, f"--ckpt_path={checkpoint}")])
        printed_resumed = _terminal_validation_steps(caplog)
    assert printed_first == [2, 4, 5] and printed_resumed == [4, 6]

    assert sorted(path.name for path in (tmp_path / "tensorboard").iterdir()) == ["version_0"]
    scalars = _scalars(tmp_path / "tensorboard" / "version_0")
    _assert_one_curve_per_tag(scalars)
    # Validation at the step the terminal printed; the killed run's 4 and 5 are gone.
    assert [step for step, _ in scalars[NDCG]] == [2, 4, 6] == printed_first[:1] + printed_resumed
    assert scalars[NDCG][-1][1] == pytest.approx(float(resumed.trainer.callback_metrics[NDCG]))
    # A training step's loss at that step's number: log_every_n_steps=1 draws steps 1 to 6.
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, MAX_STEPS + 1))


@pytest.mark.parametrize("preempted_at", [3, 4], ids=["between validations", "at a validation step"])
def test_a_preempted_run_resumed_draws_each_validation_once_at_its_step(
    demo_dir, tmp_path, small_eval_set, caplog, preempted_at
):
    """No point at the preemption step repeating the last validation, and the validation the
    preemption skipped (step 4) drawn once, by the resumed run, with the whole eval set."""
    first = cli_main(_recipe(tmp_path, small_eval_set), run=False)
    first.trainer.callbacks.append(PreemptAt(preempted_at))
    with caplog.at_level(logging.INFO, logger="callbacks.retrieval"):
        first.trainer.fit(first.model, datamodule=first.datamodule)
        assert first.trainer.global_step == preempted_at
        cli_main(["fit", *_recipe(tmp_path, small_eval_set, "--ckpt_path=last")])
    assert "not fully encoded" not in caplog.text

    assert sorted(path.name for path in (tmp_path / "tensorboard").iterdir()) == ["version_0"]
    scalars = _scalars(tmp_path / "tensorboard" / "version_0")
    _assert_one_curve_per_tag(scalars)
    for tag in (NDCG, "val/demo/recall@10/d32"):
        assert [step for step, _ in scalars[tag]] == VALIDATED == _terminal_validation_steps(caplog)
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, MAX_STEPS + 1))


def test_continuing_points_each_tensorboard_logger_at_the_checkpoints_version(tmp_path):
    checkpoint = tmp_path / "resumed.ckpt"
    torch.save({"global_step": 7, CHECKPOINT_KEY: {"tensorboard": 3}}, checkpoint)
    recorded = TensorBoardLogger(tmp_path, name="tensorboard", purge_step=None)  # as LightningCLI builds it
    chosen = TensorBoardLogger(tmp_path, name="tensorboard", version="mine")  # given: kept
    unrecorded = TensorBoardLogger(tmp_path, name="other")  # a logger the checkpoint does not know
    trainer = Trainer(accelerator="cpu", logger=[recorded, chosen, unrecorded], enable_progress_bar=False)
    continue_tensorboard_run(trainer, checkpoint)
    assert (recorded.version, chosen.version, unrecorded.version) == (3, "mine", 0)
    # Steps 1-7 are in the checkpoint; TensorBoard drops what the folder holds from step 8 on.
    assert {logger._kwargs["purge_step"] for logger in (recorded, chosen, unrecorded)} == {8}
    assert not (tmp_path / "tensorboard").exists()  # nothing opened yet: fit opens the folder
