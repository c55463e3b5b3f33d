"""The (exit x dim) grid at every nested token-table rank of a trained 3D Matryoshka run.

    python benchmarks/rank_grid.py --run runs/demo_text_only_3d --ranks 32 64 128 256
    python benchmarks/rank_grid.py --run RUN --config RECIPE -- --model.init_args.KEY=VALUE ...

Arguments after ``--`` are the overrides the run was trained with (the model is built from the
recipe and them, then the checkpoint's weights are loaded into it).

Builds the recipe's model and data, loads the run's checkpoint (the best by default) and runs one
``validate`` per rank with the factorised table cut to it (``embedding_ranks.eval_rank``); the
evaluator logs each grid as validation does. Prints, per rank, the token table's parameters and
the headline metric per (exit, dim). ``python cli.py validate --ckpt_path CKPT
--model.init_args.text_encoder.embedding_ranks.eval_rank=R`` gives one of these grids.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import torch
from common import split_passthrough  # puts the project root on sys.path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo_text_only_3d"))
    parser.add_argument("--config", default="configs/demo/text_only_3d.yaml")
    parser.add_argument("--ranks", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--checkpoint", type=Path, help="default: the run's best-*.ckpt")
    parser.add_argument("--metric", default="ndcg@10")
    own, overrides_given = split_passthrough(sys.argv[1:])
    args = parser.parse_args(own)
    from callbacks.exit_grid import exit_grid
    from callbacks.retrieval import RetrievalEvaluator
    from cli import cli_main
    from lightning_modules.components.factorised_embedding import parameters_at_rank

    checkpoint = args.checkpoint or max((args.run / "checkpoints").glob("best-*.ckpt"))
    scratch = tempfile.mkdtemp()
    overrides = [f"--trainer.default_root_dir={scratch}", "--trainer.enable_progress_bar=false"]
    cli = cli_main(["--config", args.config, *overrides_given, *overrides], run=False)
    model = cli.model
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(state, strict=False)
    (evaluator,) = [c for c in cli.trainer.callbacks if isinstance(c, RetrievalEvaluator)]
    logging.getLogger("callbacks.retrieval").setLevel(logging.WARNING)  # the grids are printed below
    table = model.text_encoder.model.get_input_embeddings()
    vocabulary, hidden = table.num_embeddings, table.embedding_dim
    lines = [
        f"{checkpoint}: {args.metric}, token table {vocabulary} x {hidden} = {vocabulary * hidden:,} dense"
    ]
    for rank in args.ranks:
        model.ranks.eval_rank = rank
        cli.trainer.validate(model, datamodule=cli.datamodule, verbose=False)
        name = next(iter(evaluator.last_scores))
        scores = {tag.split("/", 2)[2]: value for tag, value in evaluator.last_metrics.items()}
        grid = exit_grid(scores, args.metric, model.matryoshka_layers[-1])
        kept = parameters_at_rank(vocabulary, hidden, rank)
        lines.append(
            f"rank {rank} ({kept:,} table parameters, {1 - kept / (vocabulary * hidden):.1%} saved), {name}:"
        )
        dims = sorted(next(iter(grid.values())))
        lines.append("  " + " " * 10 + "".join(f"{'d' + str(dim):>9}" for dim in dims))
        for layer, row in sorted(grid.items(), reverse=True):
            lines.append(f"  {'L' + str(layer):<10}" + "".join(f"{row[dim]:9.4f}" for dim in dims))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
