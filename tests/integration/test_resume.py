"""Exact mid-epoch resume and preemption, with the streaming datamodule and a real Trainer (CPU)."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from trainers import quiet_cpu_trainer

from callbacks.preemption import CHECKPOINT_NAME, PreemptionCheckpoint
from callbacks.retrieval import RetrievalEvaluator
from datamodules.pairs import StreamingPairDataModule
from lightning_modules import TextOnly
from lightning_modules.components.text_encoder import LoraSettings, TextEncoderConfig
from lightning_modules.schedules import WarmupCosine

TOTAL_STEPS = 7  # the corpus holds 96 rows: 7 batches of 6 stay inside the first epoch (mid-epoch)


class RecordBatchIds(Callback):
    def __init__(self):
        self.ids: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids.append(list(batch["ids"]))


class SignalAtStep(Callback):
    """Sends this process a real signal during step ``step`` (as a cluster would, mid-step)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM):
        self.step, self.signum = step, signum

    def on_before_backward(self, trainer, pl_module, loss):
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), self.signum)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory, corpus_dir):
    # 96 rows of the demo corpus: small enough for seconds per run, several blocks per epoch.
    lines = (corpus_dir / "train.jsonl").read_text().splitlines()[:96]
    path = tmp_path_factory.mktemp("resume") / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _fit(root, text_model, train_file, max_steps, ckpt_path=None, callbacks=(), trainer_options=None, **data):
    seed_everything(0)
    model = TextOnly(
        # LoRA dropout draws random numbers every step, so the run is only reproduced if the
        # random generators are restored too.
        TextEncoderConfig(str(text_model), lora=LoraSettings(r=4, dropout=0.2)),
        matryoshka_dims=[32, 256],
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        lr_scheduler=lambda optimizer: WarmupCosine(optimizer, warmup_steps=3, total_steps=TOTAL_STEPS),
    )
    data = StreamingPairDataModule(
        str(text_model),
        train_data=str(train_file),
        **{"batch_size": 6, "shuffle_block_size": 20, "max_query_length": 32, "max_document_length": 48}
        | data,
    )
    recorder = RecordBatchIds()
    trainer = quiet_cpu_trainer(
        max_steps=max_steps,
        default_root_dir=root,
        callbacks=[recorder, *callbacks],
        **({"limit_val_batches": 0} | (trainer_options or {})),
    )
    trainer.fit(model, data, ckpt_path=ckpt_path)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return trainer, recorder.ids, trainable


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), (
            f"{name}: max diff {(a[name] - b[name]).abs().max():.2e}"
        )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_text_model, train_file):
    _, ids, weights = _fit(tmp_path_factory.mktemp("straight"), tiny_text_model, train_file, TOTAL_STEPS)
    assert len(ids) == TOTAL_STEPS and len({i for batch in ids for i in batch}) == 6 * TOTAL_STEPS
    return ids, weights


@pytest.mark.parametrize("stop_at", [3, 5])
def test_k_steps_then_resume_to_n_is_the_same_run(
    tmp_path, tiny_text_model, train_file, uninterrupted, stop_at
):
    """Stops mid-epoch with a step checkpoint, resumes with ``ckpt_path``: same ids, same weights."""
    every_step = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=1, save_top_k=-1)
    _, first_ids, _ = _fit(tmp_path / "first", tiny_text_model, train_file, stop_at, callbacks=[every_step])
    checkpoint = tmp_path / "checkpoints" / f"epoch=0-step={stop_at}.ckpt"
    _, resumed_ids, weights = _fit(tmp_path / "second", tiny_text_model, train_file, TOTAL_STEPS, checkpoint)
    expected_ids, expected_weights = uninterrupted
    assert first_ids + resumed_ids == expected_ids
    _assert_same_weights(weights, expected_weights)


def test_a_run_grouped_by_length_resumes_at_the_next_batch(
    tmp_path, tiny_text_model, train_file, uninterrupted
):
    """The stream yields whole batches then (the loader's batch_size is None): same resume contract."""
    grouped = {"group_by_length": True, "shuffle_block_size": 18}
    _, expected_ids, expected_weights = _fit(
        tmp_path / "straight", tiny_text_model, train_file, TOTAL_STEPS, **grouped
    )
    assert expected_ids != uninterrupted[0] and all(len(batch) == 6 for batch in expected_ids)
    every_step = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=1, save_top_k=-1)
    first = _fit(tmp_path / "first", tiny_text_model, train_file, 4, callbacks=[every_step], **grouped)
    first_ids = first[1]
    checkpoint = tmp_path / "checkpoints" / "epoch=0-step=4.ckpt"
    _, resumed_ids, weights = _fit(
        tmp_path / "second", tiny_text_model, train_file, TOTAL_STEPS, checkpoint, **grouped
    )
    assert first_ids + resumed_ids == expected_ids
    _assert_same_weights(weights, expected_weights)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_mid_epoch_leaves_a_checkpoint_that_resumes_the_same_run(
    tmp_path, tiny_text_model, train_file, uninterrupted, signum
):
    preemption = PreemptionCheckpoint(dirpath=str(tmp_path / "checkpoints"))
    trainer, first_ids, _ = _fit(
        tmp_path / "first",
        tiny_text_model,
        train_file,
        TOTAL_STEPS,
        callbacks=[preemption, SignalAtStep(4, signum)],
    )
    checkpoint = tmp_path / "checkpoints" / CHECKPOINT_NAME
    assert checkpoint.exists() and not list((tmp_path / "checkpoints").glob("*.partial"))
    assert trainer.global_step == 4 and len(first_ids) == 4  # the step in flight finished, then it stopped
    assert signal.getsignal(signal.SIGTERM) is not preemption._handle  # handlers given back
    _, resumed_ids, weights = _fit(tmp_path / "second", tiny_text_model, train_file, TOTAL_STEPS, checkpoint)
    expected_ids, expected_weights = uninterrupted
    assert first_ids + resumed_ids == expected_ids
    _assert_same_weights(weights, expected_weights)


class RecordValidationSteps(Callback):
    def __init__(self):
        self.steps: list[int] = []

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.steps.append(trainer.global_step)


def _validating(corpus_dir, val_check_interval: int) -> dict:
    return {
        "trainer_options": {
            "val_check_interval": val_check_interval,
            "check_val_every_n_epoch": None,
            "num_sanity_val_steps": 0,
            "limit_val_batches": None,
        },
        "eval_sets": {"demo": str(corpus_dir / "eval" / "demo")},
    }


def test_the_final_step_is_validated_and_saved_when_max_steps_is_off_the_validation_interval(
    tmp_path, tiny_text_model, train_file, corpus_dir
):
    """max_steps 5 at val_check_interval 3: validated at 3 and 5, and last.ckpt holds step 5."""
    validations = RecordValidationSteps()
    last = ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="last", enable_version_counter=False)
    _fit(
        tmp_path, tiny_text_model, train_file, 5, callbacks=[validations, last], **_validating(corpus_dir, 3)
    )
    assert validations.steps == [3, 5]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5


def test_a_preempted_run_does_not_export_its_text_encoder(tmp_path, tiny_text_model, train_file):
    """The export is what the next stage loads: a preempted run's weights are not the result."""
    from callbacks.export import ExportTextEncoder

    preemption = PreemptionCheckpoint(dirpath=str(tmp_path / "checkpoints"))
    export = ExportTextEncoder(str(tmp_path / "text_encoder"))
    _fit(tmp_path, tiny_text_model, train_file, TOTAL_STEPS, callbacks=[preemption, export, SignalAtStep(2)])
    assert preemption.preempted and not (tmp_path / "text_encoder").exists()
    checkpoint = tmp_path / "checkpoints" / CHECKPOINT_NAME
    resumed = PreemptionCheckpoint(dirpath=str(tmp_path / "checkpoints"))
    trainer, _, _ = _fit(tmp_path, tiny_text_model, train_file, TOTAL_STEPS, checkpoint, [resumed, export])
    assert trainer.global_step == TOTAL_STEPS and (tmp_path / "text_encoder" / "config.json").exists()


def test_a_signal_stops_without_validating_first(tmp_path, tiny_text_model, train_file, corpus_dir):
    """Lightning validates before a requested stop; within a preemption's grace period it must not."""
    validations = RecordValidationSteps()
    preemption = PreemptionCheckpoint(dirpath=str(tmp_path / "checkpoints"))
    trainer, ids, _ = _fit(
        tmp_path,
        tiny_text_model,
        train_file,
        TOTAL_STEPS,
        callbacks=[validations, preemption, SignalAtStep(2)],
        **_validating(corpus_dir, 100),
    )
    assert trainer.global_step == 2 and (tmp_path / "checkpoints" / CHECKPOINT_NAME).exists()
    assert validations.steps == []


@pytest.mark.parametrize(
    "signum, requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)], ids=["SIGUSR1", "SIGTERM"]
)
def test_under_slurm_the_requeue_signal_requeues_the_job_once_saved(
    tmp_path, monkeypatch, tiny_text_model, train_file, signum, requeued
):
    """Lightning's SLURM handler requeued on SIGUSR1; the callback replaces it, so it requeues too."""
    # No SLURM here: a stand-in scontrol on PATH records how it is called.
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    slurm = {"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    slurm |= {"SLURM_JOB_ID": "4242", "SLURM_NODELIST": "localhost", "SLURM_JOB_NAME": "train"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    preemption = PreemptionCheckpoint(dirpath=str(tmp_path / "checkpoints"))
    trainer, _, _ = _fit(
        tmp_path,
        tiny_text_model,
        train_file,
        TOTAL_STEPS,
        callbacks=[preemption, SignalAtStep(2, signum)],
        trainer_options={"plugins": [SLURMEnvironment(auto_requeue=True)]},
    )
    assert trainer.global_step == 2 and (tmp_path / "checkpoints" / CHECKPOINT_NAME).exists()
    assert (calls.read_text() if calls.exists() else None) == ("requeue 4242\n" if requeued else None)


def test_a_signal_mid_accumulation_saves_after_the_optimizer_step_and_resumes_the_same_run(
    tmp_path, tiny_text_model, train_file
):
    """accumulate_grad_batches=2, signal during micro-batch 3: a save there would hold neither
    micro-batch 3's gradient nor its row again (the data position counts it)."""
    accumulating = {"trainer_options": {"accumulate_grad_batches": 2}}
    _, straight_ids, straight_weights = _fit(
        tmp_path / "straight", tiny_text_model, train_file, 4, **accumulating
    )
    preemption = PreemptionCheckpoint(dirpath=str(tmp_path / "checkpoints"))
    trainer, first_ids, _ = _fit(
        tmp_path / "first",
        tiny_text_model,
        train_file,
        4,
        callbacks=[preemption, SignalAtStep(2)],  # sent during step 2's first micro-batch
        **accumulating,
    )
    assert trainer.global_step == 2 and len(first_ids) == 4  # saved after micro-batch 4, the step
    checkpoint = tmp_path / "checkpoints" / CHECKPOINT_NAME
    _, resumed_ids, weights = _fit(
        tmp_path / "second", tiny_text_model, train_file, 4, checkpoint, **accumulating
    )
    assert first_ids + resumed_ids == straight_ids
    _assert_same_weights(weights, straight_weights)


def test_a_signal_at_a_validation_step_validates_that_step_when_resumed(
    tmp_path, tiny_text_model, train_file, corpus_dir
):
    """Preempted during step 3 of val_check_interval 3: the save skips the validation (grace
    period) and Lightning's restart steps past it, so the resumed run validates step 3 first."""
    first = RecordValidationSteps()
    preemption = PreemptionCheckpoint(dirpath=str(tmp_path / "checkpoints"))
    _fit(
        tmp_path / "first",
        tiny_text_model,
        train_file,
        TOTAL_STEPS,
        callbacks=[first, preemption, SignalAtStep(3)],
        **_validating(corpus_dir, 3),
    )
    assert first.steps == []
    resumed = RecordValidationSteps()
    best = ModelCheckpoint(
        dirpath=tmp_path / "best", monitor="val/demo/ndcg@10/d256", mode="max", save_top_k=-1
    )
    checkpoint = tmp_path / "checkpoints" / CHECKPOINT_NAME
    _fit(
        tmp_path / "second",
        tiny_text_model,
        train_file,
        TOTAL_STEPS,
        checkpoint,
        callbacks=[resumed, PreemptionCheckpoint(str(tmp_path / "checkpoints")), RetrievalEvaluator(), best],
        **_validating(corpus_dir, 3),
    )
    assert resumed.steps == [3, 6, 7]
    saved = {int(path.stem.split("step=")[1]): path for path in (tmp_path / "best").glob("*.ckpt")}
    assert sorted(saved) == [3, 6, 7]
    # Written by that validation: resuming from it must not run the validation once more.
    state = torch.load(saved[3], weights_only=True)["callbacks"]["PreemptionCheckpoint"]
    assert state == {"validation_pending_at": None}
