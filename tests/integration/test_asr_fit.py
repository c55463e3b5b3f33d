"""The demo's CTC recognizer (configs/demo/asr_ctc.yaml, made tiny): it resumes as the same run (its
dropout draws and data position come back, so k steps then a resume to n equal n steps straight),
validating more often trains the same weights, and its export holds the best checkpoint's weights."""

from __future__ import annotations

import torch
from demo_recipes import ROOT
from trainers import PreemptAt

from cli import cli_main

STEPS = 4


def _args(root, max_steps, *extra) -> list[str]:
    args = [
        "fit",
        "--config",
        str(ROOT / "configs" / "demo" / "asr_ctc.yaml"),
        # Dropout draws every step: without the random states restored, a resume would differ.
        '--model.init_args.architecture={"model_type": "wav2vec2-bert", "hidden_size": 32, '
        '"num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64, '
        '"feature_projection_input_dim": 160, "conv_depthwise_kernel_size": 5, "add_adapter": false, '
        '"layerdrop": 0.0, "hidden_dropout": 0.3, "mask_time_prob": 0.0}',
        f"--model.init_args.lr_scheduler.init_args.total_steps={STEPS}",  # the same schedule in both
        "--model.init_args.lr_scheduler.init_args.warmup_steps=1",
        "--data.init_args.batch_size=8",
        "--data.init_args.shuffle_block_size=40",
        "--data.init_args.num_workers=0",
        f"--trainer.max_steps={max_steps}",
        "--trainer.val_check_interval=2",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}",
    ]
    return args + list(extra)


def _fit(root, max_steps, ckpt_path=None, *extra):
    cli = cli_main(_args(root, max_steps, *extra, *([f"--ckpt_path={ckpt_path}"] if ckpt_path else [])))
    return {name: p.detach().clone() for name, p in cli.model.named_parameters()}


def test_k_steps_then_resume_to_n_is_the_same_run(tmp_path, demo_dir):
    straight = _fit(tmp_path / "straight", STEPS)
    _fit(tmp_path / "first", 2)
    resumed = _fit(tmp_path / "second", STEPS, tmp_path / "first" / "checkpoints" / "last.ckpt")
    assert straight.keys() == resumed.keys() and straight
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    # The run moved the weights (a resume that trained nothing would pass the check above too).
    first_steps = torch.load(tmp_path / "first" / "checkpoints" / "last.ckpt", weights_only=True)
    assert first_steps["global_step"] == 2
    lm_head = first_steps["state_dict"]["model.lm_head.weight"]
    assert not torch.equal(lm_head, straight["model.lm_head.weight"])


def test_the_export_holds_the_best_checkpoints_weights(tmp_path, demo_dir):
    from transformers import AutoModelForCTC

    # The best checkpoint by a monitor that picks the first validation (step 2) of the two: the
    # export must then differ from the final weights.
    final = _fit(tmp_path, STEPS, None, "--best_checkpoint.monitor=step", "--best_checkpoint.mode=min")
    best = torch.load(tmp_path / "checkpoints" / "best-step=2.ckpt", weights_only=True)["state_dict"]
    exported = AutoModelForCTC.from_pretrained(tmp_path / "asr").state_dict()
    assert exported.keys() == {name.removeprefix("model.") for name in best}
    for name, value in exported.items():
        assert torch.equal(value, best[f"model.{name}"]), name
    assert not torch.equal(exported["lm_head.weight"], final["model.lm_head.weight"])


def test_a_preempted_fit_exports_nothing(tmp_path, demo_dir):
    """Pipelined loads the export as the finished recognizer: half-trained weights must not land there."""
    cli = cli_main(_args(tmp_path, STEPS)[1:], run=False)  # without the subcommand: fit by hand
    cli.trainer.callbacks.append(PreemptAt(3))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 3
    assert (tmp_path / "checkpoints" / "last-preempted.ckpt").exists() and not (tmp_path / "asr").exists()


def test_how_often_a_run_validates_does_not_change_its_training(tmp_path, demo_dir):
    """Validating at step 2 (and 4) or only at 4 trains the same weights: validation draws nothing
    from the generators dropout uses (its loader's seed comes from a generator of its own)."""
    every_two = _fit(tmp_path / "every-two", STEPS)
    at_the_end = _fit(tmp_path / "at-the-end", STEPS, None, f"--trainer.val_check_interval={STEPS}")
    assert every_two.keys() == at_the_end.keys() and every_two
    for name in every_two:
        assert torch.equal(every_two[name], at_the_end[name]), name
