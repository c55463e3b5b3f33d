"""The demo's CTC recognizer (configs/demo/asr_ctc.yaml, made tiny) resumes as the same run: its
dropout draws and data position come back, so k steps then a resume to n equal n steps straight."""

from __future__ import annotations

import torch
from demo_recipes import ROOT

from cli import cli_main

STEPS = 4


def _fit(root, max_steps, ckpt_path=None):
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
        # Both runs validate at step 2 (the first one's checkpoint is written after it): creating
        # the validation loader draws from torch's generator, so a run that skipped it would differ.
        "--trainer.val_check_interval=2",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}",
    ]
    cli = cli_main(args + ([f"--ckpt_path={ckpt_path}"] if ckpt_path else []))
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
