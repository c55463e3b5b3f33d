"""The demo recipes cut into the pieces the CLI composes: a model block, and everything else."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODELS = ("text_only.yaml", "late_fusion.yaml", "dual_retrieval.yaml", "dual_alignment.yaml")


def model_section(config: str, path: Path, max_steps: int) -> Path:
    """The ``model:`` block of a demo recipe, alone in a file (what ``--model FILE`` reads).

    A file given to ``--model`` is resolved on its own, so the schedule's ``${trainer.max_steps}``
    is written out as the number it stands for, and its warmup shortened to fit this short run.
    """
    text = (ROOT / "configs" / "demo" / config).read_text().replace("${trainer.max_steps}", str(max_steps))
    section = yaml.safe_load(text)["model"]
    section["init_args"]["lr_scheduler"]["init_args"]["warmup_steps"] = 1
    path.write_text(yaml.safe_dump(section))
    return path


def recipe_without_model(config: str, path: Path) -> Path:
    """A demo recipe's trainer, callbacks and data, without its model (``--config`` for any model)."""
    shared = yaml.safe_load((ROOT / "configs" / "demo" / config).read_text())
    del shared["model"]
    path.write_text(yaml.safe_dump(shared))
    return path


def quick_text_only(root: Path, *extra: str) -> list[str]:
    """CLI arguments: the text-only demo recipe shrunk to seconds, writing under ``root``."""
    return [
        "--config",
        str(ROOT / "configs" / "demo" / "text_only.yaml"),
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root}",
        "--data.init_args.batch_size=8",
        "--data.init_args.num_workers=0",
        "--model.init_args.lr_scheduler.init_args.warmup_steps=1",
        *extra,
    ]
