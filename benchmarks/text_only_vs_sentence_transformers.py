"""(a) Text-only training throughput: this project vs sentence-transformers, same model, data, batch.

Both sides fine-tune the same tiny Qwen3 (every weight trains) on the same pairs with Matryoshka
InfoNCE over dims 32/64/128/256: here ``TextOnly`` in a Lightning ``Trainer`` reading the pairs
with the streaming datamodule; there ``MatryoshkaLoss(MultipleNegativesRankingLoss)`` (scale 20 =
temperature 0.05) in ``SentenceTransformerTrainer``, as the paper's code. Same fused AdamW (lr 2e-5, no
weight decay, constant rate, no clipping), no prompts, same token limit, one CPU process each.
This project runs the final decoder layer at the pooled token only (``pooled_final_layer``, the
same embeddings): with the demo's 2 layers that removes ~45 % of the model's FLOPs, with
Qwen3-0.6B's 28 about 3 %, so ``--layers`` sets the depth and ``--full-final-layer`` turns it off.
Each step is timed from its start to the next step's start (data fetch included) after
``--warmup`` steps; each side runs ``--rounds`` times, alternating. Two figures per side: the median
step over all rounds (robust to the spikes another process on this 2-core machine causes, which
hit one side or the other at random) and the best round's mean (the least disturbed round).

    python benchmarks/text_only_vs_sentence_transformers.py [--batch-size 32] [--steps 30]
        [--rounds 2] [--layers 2] [--full-final-layer]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from common import (
    DIMS,
    accelerator,
    machine,
    print_table,
    real_size_models,
    sentence_transformer,
    synthetic_pairs,
    tiny_text_model,
)
from lightning.pytorch import Callback, Trainer, seed_everything
from transformers import AutoTokenizer, TrainerCallback

from datamodules.pairs import StreamingPairDataModule
from datamodules.text_batches import PromptConfig
from datamodules.tiny_models import save_tiny_text_model
from lightning_modules import TextOnly
from lightning_modules.components.text_encoder import TextEncoderConfig
from lightning_modules.losses import MatryoshkaInfoNCE


class _StepClock:
    """Start time of every step from ``warmup`` on; a step lasts until the next one starts."""

    def __init__(self, warmup: int):
        self.warmup, self.starts = warmup, []

    def mark(self, step: int) -> None:
        if step >= self.warmup:
            self.starts.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        return [later - earlier for earlier, later in zip(self.starts, self.starts[1:], strict=False)]


class _LightningClock(Callback, _StepClock):
    def __init__(self, warmup: int):
        _StepClock.__init__(self, warmup)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.mark(trainer.global_step)


class _HuggingFaceClock(TrainerCallback, _StepClock):
    def __init__(self, warmup: int):
        _StepClock.__init__(self, warmup)

    def on_step_begin(self, args, state, control, **kwargs):
        self.mark(state.global_step)


def this_project(text_model, train_file, args) -> tuple[list[float], float]:
    seed_everything(0)
    model = TextOnly(
        TextEncoderConfig(text_model, pooled_final_layer=not args.full_final_layer),
        matryoshka_dims=DIMS,
        loss=MatryoshkaInfoNCE(temperature=0.05),
        # Fused, as the HF Trainer's default (adamw_torch_fused): the same optimizer on both sides.
        optimizer=lambda params: torch.optim.AdamW(params, lr=2e-5, weight_decay=0.0, fused=True),
    )
    data = StreamingPairDataModule(
        text_model,
        train_data=str(train_file),
        prompts=PromptConfig(query_template="{query}"),
        batch_size=args.batch_size,
        max_query_length=args.max_length,
        max_document_length=args.max_length,
        shuffle_block_size=1000,
    )
    clock = _LightningClock(args.warmup)
    trainer = Trainer(
        accelerator=accelerator(args.device),
        devices=1,
        precision="bf16-mixed" if args.bf16 else "32-true",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[clock],
    )
    trainer.fit(model, data)
    return clock.step_seconds(), float(trainer.callback_metrics.get("train/loss", float("nan")))


def sentence_transformers_side(text_model, pairs, args, output_dir) -> tuple[list[float], float]:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss

    torch.manual_seed(0)
    model = sentence_transformer(text_model, args.max_length, args.device)
    loss = MatryoshkaLoss(model, MultipleNegativesRankingLoss(model, scale=20.0), matryoshka_dims=DIMS[::-1])
    dataset = Dataset.from_list([{"anchor": p["query"], "positive": p["document"]} for p in pairs])
    training_args = SentenceTransformerTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=2e-5,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=0.0,
        logging_steps=args.steps,
        save_strategy="no",
        report_to="none",
        use_cpu=args.device == "cpu",
        bf16=args.bf16,
        dataloader_drop_last=True,
        seed=0,
        disable_tqdm=True,
    )
    clock = _HuggingFaceClock(args.warmup)
    trainer = SentenceTransformerTrainer(
        model=model, args=training_args, train_dataset=dataset, loss=loss, callbacks=[clock]
    )
    result = trainer.train()
    return clock.step_seconds(), result.training_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2, help="tiny Qwen3 depth (demo: 2; Qwen3-0.6B: 28)")
    parser.add_argument(
        "--full-final-layer", action="store_true", help="this project's final layer at every position too"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both stacks on it)")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision on both sides")
    parser.add_argument(
        "--real-size",
        action="store_true",
        help="Qwen3-0.6B's shapes (random weights) instead of the tiny model",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    steps = {"this project (Lightning)": [], "sentence-transformers": []}  # per round: step seconds
    losses = {}
    with tempfile.TemporaryDirectory() as directory:
        text_model = tiny_text_model()
        if args.real_size:
            text_model = real_size_models(Path(directory), args.layers if args.layers != 2 else None)[0]
        elif args.layers != 2:
            text_model = str(Path(directory) / f"tiny-qwen3-{args.layers}-layers")
            save_tiny_text_model(Path(text_model), tokenizer_source=tiny_text_model(), num_layers=args.layers)
        tokenizer = AutoTokenizer.from_pretrained(text_model)
        pairs = synthetic_pairs(tokenizer, args.batch_size * args.steps, 16, args.max_length)
        # Real tokens per example (query + document, as truncated): the tokens/s column.
        lengths = [
            min(len(tokenizer(p[side])["input_ids"]), args.max_length)
            for p in pairs
            for side in ("query", "document")
        ]
        tokens_per_example = sum(lengths) / len(pairs)
        train_file = Path(directory) / "pairs.jsonl"
        train_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        for _ in range(args.rounds):
            seconds, losses["this project (Lightning)"] = this_project(text_model, train_file, args)
            steps["this project (Lightning)"].append(seconds)
            seconds, losses["sentence-transformers"] = sentence_transformers_side(
                text_model, pairs, args, str(Path(directory) / "st")
            )
            steps["sentence-transformers"].append(seconds)
    median_rate = {
        name: args.batch_size / statistics.median([s for r in rounds for s in r])
        for name, rounds in steps.items()
    }
    round_rates = {
        name: [args.batch_size * len(r) / sum(r) for r in rounds] for name, rounds in steps.items()
    }
    print(f"machine: {machine(args.device)}")
    final_layer = "every position" if args.full_final_layer else "the pooled token only"
    model_name = "Qwen3-0.6B shapes" if args.real_size else "tiny Qwen3"
    model_name += f" of {args.layers if not args.real_size or args.layers != 2 else 28} layers"
    print(
        f"batch {args.batch_size}, {args.steps} steps ({args.warmup} warm-up), queries of 16 or "
        f"more tokens, documents of {args.max_length}, dims {DIMS}, rounds {args.rounds}; {model_name}, "
        f"this project's final layer at {final_layer}; {'bf16-mixed' if args.bf16 else 'float32'}"
    )
    print_table(
        f"Text-only training throughput ({args.device})",
        [
            "stack",
            "examples/s (median step)",
            "tokens/s (median step)",
            "examples/s (best round)",
            "all rounds",
            "final loss",
        ],
        [
            [
                name,
                f"{median_rate[name]:.1f}",
                f"{median_rate[name] * tokens_per_example:.0f}",
                f"{max(round_rates[name]):.1f}",
                ", ".join(f"{r:.1f}" for r in round_rates[name]),
                f"{losses[name]:.3f}",
            ]
            for name in steps
        ],
    )
    ours, theirs = "this project (Lightning)", "sentence-transformers"
    median_ratio = median_rate[ours] / median_rate[theirs]
    best_ratio = max(round_rates[ours]) / max(round_rates[theirs])
    print(
        f"\nthroughput ratio this project / sentence-transformers: {median_ratio:.2f}x (median step), "
        f"{best_ratio:.2f}x (best round)"
    )


if __name__ == "__main__":
    main()
