"""The model comparison table (the reference paper's Tables 1-3), from the demo recipes, in one command.

    python benchmarks/comparison_table.py                    # every demo recipe, trained in turn
    python benchmarks/comparison_table.py --reuse            # reuse finished runs under --out
    python benchmarks/comparison_table.py --recipes text_only late_fusion -- --trainer.max_steps=30

Each recipe runs as its README command does (`python cli.py fit --config configs/demo/<recipe>.yaml`,
its own child process, on the same demo assets) into ``<out>/<recipe>``; ``--reuse`` skips a recipe
whose run there finished (a fit: its ``checkpoints/last.ckpt`` is there; an evaluation: its
TensorBoard file is).
Anything after ``--`` is passed to every recipe's command. The table is read back from each run's
TensorBoard file: the last validation's nDCG@10 per dim on the demo's spoken retrieval set (for
the text-only row, the same queries as written text: the oracle transcript), keyword-spotting
and zero-shot intent accuracy at the largest dim, the recognizer's character and word error rates
(the cascade), then the trainable parameters (counted on the recipe's model) and the seconds per
training step (median over the logged steps, validation excluded). Written to
``<out>/comparison.md`` and ``<out>/comparison.csv``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import ROOT, split_passthrough  # puts the project root on sys.path


@dataclass(frozen=True)
class Recipe:
    config: str
    label: str
    subcommand: str = "fit"
    """``validate`` for an evaluation-only model (nothing to train)."""


# Rows in the paper's order: the text ceiling, then the speech models.
RECIPES = {
    "text_only": Recipe("configs/demo/text_only.yaml", "text-only (oracle transcripts)"),
    "text_only_3d": Recipe("configs/demo/text_only_3d.yaml", "text-only 3D, 8 layers (full-depth exit)"),
    "late_fusion": Recipe("configs/demo/late_fusion.yaml", "late fusion"),
    "unit_fusion": Recipe("configs/demo/unit_fusion.yaml", "unit fusion (discrete units)"),
    "dual_retrieval": Recipe("configs/demo/dual_retrieval.yaml", "dual encoder, retrieval"),
    "dual_alignment": Recipe("configs/demo/dual_alignment.yaml", "dual encoder, alignment"),
    # The cascade: the demo's CTC recognizer, then the text stage (nothing trains in its run).
    "pipelined": Recipe("configs/demo/pipelined.yaml", "pipelined (demo ASR, then text)", "validate"),
}
RETRIEVAL_SET, CLASSIFICATION_SETS = "demo", ("keywords", "intents")


def latest_event_file(run_dir: Path) -> Path:
    versions = sorted((run_dir / "tensorboard").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    files = sorted(versions[-1].glob("events.out.tfevents.*")) if versions else []
    if not files:
        raise FileNotFoundError(f"no TensorBoard events under {run_dir / 'tensorboard'}: did the run start?")
    return max(files, key=lambda p: p.stat().st_size)


def read_scalars(event_file: Path) -> dict[str, list[tuple[int, float, float]]]:
    """Tag -> [(step, value, wall time)] in logging order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(e.step, e.value, e.wall_time) for e in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def seconds_per_step(scalars: dict[str, list[tuple[int, float, float]]]) -> float | None:
    """Median wall time per step between consecutive ``train/loss`` points (a gap that holds a
    validation is an outlier the median ignores)."""
    points = scalars.get("train/loss", [])
    rates = [(w2 - w1) / (s2 - s1) for (s1, _, w1), (s2, _, w2) in itertools.pairwise(points) if s2 > s1]
    return statistics.median(rates) if rates else None


def row_of_run(name: str, run_dir: Path, trainable: int | None) -> dict:
    scalars = read_scalars(latest_event_file(run_dir))
    last = {tag: points[-1] for tag, points in scalars.items()}
    retrieval = sorted(
        (int(tag.rsplit("/d", 1)[1]), value)
        for tag, (_, value, _) in last.items()
        if tag.startswith(f"val/{RETRIEVAL_SET}/ndcg@10/d")
    )
    if not retrieval:
        raise ValueError(f"{run_dir}: no val/{RETRIEVAL_SET}/ndcg@10 scalars: the run never validated.")
    top = retrieval[-1][0]
    recipe = RECIPES.get(name)
    trains = recipe is None or recipe.subcommand == "fit"
    steps = max(step for step, _, _ in scalars[f"val/{RETRIEVAL_SET}/ndcg@10/d{top}"])
    row = {
        "model": recipe.label if recipe else name,
        "recipe": recipe.config if recipe else name,
        "steps": steps if trains else None,  # an evaluation-only run (the cascade) trains nothing
    }
    row |= {f"ndcg@10/d{dim}": value for dim, value in retrieval}
    for eval_set in CLASSIFICATION_SETS:
        point = last.get(f"val/{eval_set}/accuracy/d{top}")
        row[f"{eval_set} accuracy/d{top}"] = None if point is None else point[1]
    for rate in ("cer", "wer"):  # a model that transcribes: its recognizer's error rates
        point = last.get(f"val/{RETRIEVAL_SET}/{rate}")
        row[f"ASR {rate.upper()}"] = None if point is None else point[1]
    row["trainable parameters"] = trainable
    row["s/step"] = seconds_per_step(scalars)
    return row


def trainable_parameters(config: str, run_dir: Path) -> int:
    """The recipe's model, built as `fit` builds it (no training), its trainable parameters counted."""
    from cli import cli_main

    cli = cli_main(["--config", str(ROOT / config), f"--trainer.default_root_dir={run_dir}"], run=False)
    return sum(p.numel() for p in cli.model.parameters() if p.requires_grad)


def finished(recipe: Recipe, run_dir: Path) -> bool:
    if recipe.subcommand == "fit":
        return (run_dir / "checkpoints" / "last.ckpt").exists()
    return any((run_dir / "tensorboard").glob("version_*/events.out.tfevents.*"))


def run_recipe(recipe: Recipe, run_dir: Path, extra: list[str]) -> float:
    command = [sys.executable, "cli.py", recipe.subcommand, "--config", recipe.config]
    command += [f"--trainer.default_root_dir={run_dir}", *extra]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    return time.perf_counter() - start


def markdown(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row if key != "recipe"))

    def cell(value) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.3f}"
        if isinstance(value, int) and value >= 10_000:
            return f"{value / 1e6:.2f} M"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    argv, extra = split_passthrough(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/comparison", help="Folder of the runs and the tables.")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--reuse", action="store_true", help="Reuse finished runs under --out.")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    rows, wall = [], {}
    for name in args.recipes:
        run_dir = out / name
        if not (args.reuse and finished(RECIPES[name], run_dir)):
            wall[name] = run_recipe(RECIPES[name], run_dir, extra)
        recipe = RECIPES[name]
        trainable = trainable_parameters(recipe.config, run_dir) if recipe.subcommand == "fit" else None
        rows.append(row_of_run(name, run_dir, trainable))
    table = markdown(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(table + "\n")
    with open(out / "comparison.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)
    print(table)
    for name, seconds in wall.items():
        print(f"{name}: {seconds / 60:.1f} min")
    print(f"written: {out / 'comparison.md'}, {out / 'comparison.csv'}")
    return rows


if __name__ == "__main__":
    main()
