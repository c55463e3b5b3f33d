"""GradCache step time with and without trimming each chunk's padding, on documents of mixed lengths.

A batch is padded to its longest document; a GradCache chunk of short documents cut from it
carries that padding unless the chunk drops the columns that are padding in all its rows
(``lightning_modules.grad_cache.trim_padding``, what the project does). Documents follow a
long-tailed length distribution (log-normal around ``--median-tokens``, cut to 16..``--max-tokens``),
as real corpora do. Same model, same batches, both settings alternating in one process; the loss
is checked equal.

    python benchmarks/grad_cache_padding.py [--batch-size 64] [--chunk 16] [--median-tokens 64]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np
import torch
from common import DIMS, machine, print_table, text_of_tokens, tiny_text_model, vocabulary
from transformers import AutoTokenizer

import lightning_modules.grad_cache as grad_cache
from datamodules.pairs import StreamingPairDataModule
from lightning_modules import TextOnly
from lightning_modules.components.text_encoder import TextEncoderConfig

SETTINGS = {
    "chunks keep the batch's padding": grad_cache.batch_rows,  # baseline: each chunk at the batch's width
    "chunks trimmed (the project)": grad_cache.chunk_rows,
}


def step_seconds(model, batch, chunk_rows) -> tuple[float, float]:
    grad_cache.chunk_rows = chunk_rows
    model.zero_grad()
    started = time.perf_counter()
    loss = model.training_loss(batch)
    loss.backward()
    return time.perf_counter() - started, float(loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--median-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    text_model = tiny_text_model()
    tokenizer = AutoTokenizer.from_pretrained(text_model)
    words, rng = vocabulary(tokenizer), random.Random(0)
    lengths = np.random.default_rng(0).lognormal(
        np.log(args.median_tokens), 0.8, args.batch_size * args.batches
    )
    lengths = np.clip(lengths, 16, args.max_tokens).astype(int)
    rows = [
        {
            "id": str(i),
            "query": text_of_tokens(tokenizer, words, 16, rng),
            "document": text_of_tokens(tokenizer, words, int(n), rng),
        }
        for i, n in enumerate(lengths)
    ]
    data = StreamingPairDataModule(text_model, max_query_length=64, max_document_length=args.max_tokens)
    batches = [
        data.batches.training_batch(rows[i : i + args.batch_size])
        for i in range(0, len(rows), args.batch_size)
    ]
    torch.manual_seed(0)
    model = TextOnly(
        TextEncoderConfig(text_model), matryoshka_dims=DIMS, gradient_chunk_size=args.chunk
    ).train()

    times = {name: [] for name in SETTINGS}
    losses = {name: [] for name in SETTINGS}
    step_seconds(model, batches[0], grad_cache.chunk_rows)  # warm-up
    for _ in range(args.rounds):
        for batch in batches:
            for name, chunk_rows in SETTINGS.items():
                seconds, loss = step_seconds(model, batch, chunk_rows)
                times[name].append(seconds)
                losses[name].append(loss)
    grad_cache.chunk_rows = SETTINGS["chunks trimmed (the project)"]
    loss_diff = max(abs(a - b) for a, b in zip(*losses.values(), strict=True))
    assert loss_diff < 1e-4, f"trimming changed the loss by {loss_diff:.1e}"

    print(f"machine: {machine()}")
    real = [int(b["document"]["attention_mask"].sum(dim=1).median()) for b in batches]
    padded = [b["document"]["input_ids"].shape[1] for b in batches]
    print(
        f"batch {args.batch_size}, GradCache chunk {args.chunk}, tiny Qwen3 fully trained, dims {DIMS}; "
        f"document tokens per batch: median {real}, padded to {padded}"
    )
    medians = {name: statistics.median(values) for name, values in times.items()}
    print_table(
        "GradCache training step (forward without graph, loss, replayed forward + backward)",
        ["setting", "median step (s)"],
        [[name, f"{seconds:.3f}"] for name, seconds in medians.items()],
    )
    padded_step, trimmed_step = (medians[name] for name in SETTINGS)
    print(f"\nspeed-up from trimming: {padded_step / trimmed_step:.2f}x; max |loss diff| {loss_diff:.1e}")


if __name__ == "__main__":
    main()
