"""A short fit of each demo recipe on the device with ``precision: bf16-mixed``: it runs there,
in bf16, and learns (the training loss falls)."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import pytest
import torch
from demo_recipes import DEMO_MODELS, ROOT, model_section, recipe_without_model
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cli import cli_main

# On a GPU the fits run 60 steps; the device script's dry run on a CPU shortens them to a few,
# which checks that they run (under 20 steps, loss falling is not asked: too few to average).
STEPS = int(os.environ.get("GPU_CHECK_FIT_STEPS", "60"))
WINDOW = 5  # steps averaged at each end


def _training_losses(run: Path) -> list[float]:
    """The run's ``train/loss`` per step, as TensorBoard shows it."""
    (folder,) = (run / "tensorboard").iterdir()
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    return [event.value for event in sorted(events.Scalars("train/loss"), key=lambda e: e.step)]


@pytest.mark.parametrize("recipe", DEMO_MODELS)
def test_demo_recipe_learns_in_bf16_on_the_device(device, demo_dir, tmp_path, monkeypatch, recipe, figure):
    monkeypatch.chdir(ROOT)
    cli = cli_main(
        [
            "fit",
            f"--config={recipe_without_model(recipe, tmp_path / 'trainer-and-data.yaml')}",
            f"--model={model_section(recipe, tmp_path / 'model.yaml', max_steps=STEPS)}",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            f"--trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
            "--trainer.precision=bf16-mixed",
            f"--trainer.max_steps={STEPS}",
            f"--trainer.val_check_interval={STEPS}",
            "--trainer.enable_progress_bar=false",
            "--trainer.log_every_n_steps=1",
            "--data.init_args.batch_size=16",
        ]
    )
    losses = _training_losses(tmp_path / "run")
    assert cli.trainer.global_step == STEPS and len(losses) == STEPS
    assert cli.trainer.precision == "bf16-mixed"
    assert next(p for p in cli.model.parameters() if p.requires_grad).device.type == device.type
    first, last = statistics.mean(losses[:WINDOW]), statistics.mean(losses[-WINDOW:])
    figure("training loss, first steps", first)
    figure("training loss, last steps", last)
    # Learning, not noise: the last steps' loss under 90 % of the first steps'.
    figure("last / first", last / first, 0.9 if STEPS >= 4 * WINDOW else None)
    assert torch.isfinite(torch.tensor(losses)).all()
