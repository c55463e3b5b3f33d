"""The 3D demo recipe, shrunk to seconds: the (exit x dim) grid at every validation, the export."""

from __future__ import annotations

import pytest
from demo_recipes import ROOT

from cli import cli_main


@pytest.mark.slow
def test_the_3d_demo_logs_the_exit_grid_every_validation_and_exports_its_exit(demo_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModel

    args = [
        "fit",
        f"--config={ROOT / 'configs' / 'demo' / 'text_only_3d.yaml'}",
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=2",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--data.init_args.batch_size=8",
        "--model.init_args.lr_scheduler.init_args.warmup_steps=1",
        # The best checkpoint by an early exit's score: the 4-layer model a user would export.
        "--best_checkpoint.monitor=val/demo/ndcg@10/L4/d256",
    ]
    cli = cli_main(args)
    assert cli.model.matryoshka_layers == [1, 2, 4, 6, 8]
    (events,) = tmp_path.glob("tensorboard/version_*/events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    for layer in (1, 2, 4, 6):
        for dim in (32, 64, 128, 256):
            tag = f"val/demo/ndcg@10/L{layer}/d{dim}"
            assert [event.step for event in accumulator.Scalars(tag)] == [2, 4], tag
    assert (
        "val/demo/ndcg@10/d256" in scalars and "val/demo/ndcg@10/L8/d256" not in scalars
    )  # full depth: as before
    assert [event.step for event in accumulator.Images("val/demo/exit_grid")] == [2, 4]
    at_exit = accumulator.Scalars("val/demo/ndcg@10/L4/d256")
    best = cli.trainer.checkpoint_callback
    assert best.monitor == "val/demo/ndcg@10/L4/d256"
    assert float(best.best_model_score) == pytest.approx(max(event.value for event in at_exit))
    assert "train/info_nce_L4_loss" in scalars
    exported = AutoModel.from_pretrained(tmp_path / "text_encoder_L4")
    assert exported.config.num_hidden_layers == 4 and len(exported.layers) == 4
