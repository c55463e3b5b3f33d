"""bf16-mixed training for every model, with frozen towers loaded directly in bf16 (half the memory)."""

from __future__ import annotations

import math

import pytest
import torch
from demo_recipes import ROOT, model_section, recipe_without_model

from cli import cli_main

# Towers that are frozen in each demo recipe, loaded in bf16 here; trainable weights stay float32.
FROZEN_IN_BF16 = {
    "text_only.yaml": [],  # the whole text model trains
    "late_fusion.yaml": ["text_encoder", "speech_encoder"],  # LoRA adapters train on the bf16 base
    "dual_retrieval.yaml": ["text_encoder"],
    "dual_alignment.yaml": ["text_encoder"],
}


@pytest.mark.parametrize("recipe", sorted(FROZEN_IN_BF16))
def test_bf16_mixed_trains_every_model_with_frozen_towers_in_bf16(demo_dir, tmp_path, monkeypatch, recipe):
    monkeypatch.chdir(ROOT)
    shared = recipe_without_model("late_fusion.yaml", tmp_path / "trainer-and-data.yaml")
    towers = FROZEN_IN_BF16[recipe]
    cli = cli_main(
        [
            "fit",
            f"--config={shared}",
            f"--model={model_section(recipe, tmp_path / 'model.yaml', max_steps=2)}",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            "--trainer.precision=bf16-mixed",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--trainer.enable_progress_bar=false",
            "--data.init_args.batch_size=8",
            *[f"--model.init_args.{tower}.dtype=bfloat16" for tower in towers],
        ]
    )
    model, metrics = cli.model, cli.trainer.callback_metrics
    assert cli.trainer.global_step == 2 and math.isfinite(float(metrics["train/loss"]))
    assert 0.0 <= float(metrics["val/demo/ndcg@10/d256"]) <= 1.0
    for tower in towers:
        frozen = [p for p in getattr(model, tower).parameters() if not p.requires_grad]
        assert frozen and all(p.dtype == torch.bfloat16 for p in frozen), tower
        # Half the bytes of the same weights in float32.
        assert sum(p.element_size() * p.numel() for p in frozen) == 2 * sum(p.numel() for p in frozen)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # master weights stay float32
