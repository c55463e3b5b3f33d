"""An exported early exit against the exit it was cut from: the eval queries, both ways.

    python benchmarks/exported_exit.py --run runs/demo_text_only_3d --layers 4

Builds the recipe's model, loads the checkpoint the export was made from (the best one by
default), and embeds every eval query at the exit in training (``embed_queries``, batched as
validation batches them, ``(layers, dim)`` keys); then loads the exported folder with
``transformers.AutoModel.from_pretrained``, as a deployment would, runs each query alone
(no padding), takes the last token's state and slices it per dim. Prints the largest absolute
difference per dim (acceptance: below 1e-5 in float32).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo_text_only_3d"))
    parser.add_argument("--config", default="configs/demo/text_only_3d.yaml")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--export", type=Path, help="default: <run>/text_encoder_L<layers>")
    parser.add_argument("--checkpoint", type=Path, help="default: the run's best-*.ckpt")
    args = parser.parse_args()
    from transformers import AutoModel

    from cli import cli_main

    export = args.export or args.run / f"text_encoder_L{args.layers}"
    checkpoint = args.checkpoint or max((args.run / "checkpoints").glob("best-*.ckpt"))
    with tempfile.TemporaryDirectory() as scratch:
        cli = cli_main(["--config", args.config, f"--trainer.default_root_dir={scratch}"], run=False)
    model = cli.model
    model.load_state_dict(
        torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"], strict=False
    )
    model.eval().on_validation_epoch_start()  # the evaluation rank, when the table has nested ranks
    exported = AutoModel.from_pretrained(export).eval()
    assert exported.config.num_hidden_layers == args.layers, exported.config.num_hidden_layers
    cli.datamodule.setup("validate")
    worst = dict.fromkeys(model.matryoshka_dims, 0.0)
    queries = 0
    with torch.no_grad():
        for batch in cli.datamodule.val_dataloader():
            if batch["side"] != "queries":
                continue
            in_training = model.embed_queries(batch)
            inputs = batch["query_text"]
            for row, (ids, mask) in enumerate(
                zip(inputs["input_ids"], inputs["attention_mask"], strict=True)
            ):
                alone = ids[mask.bool()][None]
                state = exported(input_ids=alone).last_hidden_state[0, -1]
                for dim in model.matryoshka_dims:
                    key = dim if args.layers == model.matryoshka_layers[-1] else (args.layers, dim)
                    difference = (F.normalize(state[:dim], dim=-1) - in_training[key][row]).abs().max()
                    worst[dim] = max(worst[dim], float(difference))
                queries += 1
    print(
        f"{queries} eval queries, exit at {args.layers} layers, checkpoint {checkpoint.name}, export {export}"
    )
    for dim, value in worst.items():
        print(f"  d{dim}: max |exported - in training| = {value:.2e}")


if __name__ == "__main__":
    main()
