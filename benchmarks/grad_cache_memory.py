"""(c) Peak memory of one training step at batch 256, with and without GradCache (chunk 16).

Each setting runs in its own fresh process, so its peak resident memory is its own; both
processes build the same model and batch (same seed) and save their gradients, which are
compared here. Text-only model (fully trained tiny Qwen3), queries of 32 and documents of 256
tokens.

    python benchmarks/grad_cache_memory.py [--batch-size 256] [--chunk 16]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from common import (
    DIMS,
    machine,
    peak_rss_mb,
    print_table,
    run_child,
    text_of_tokens,
    tiny_text_model,
    vocabulary,
)

from datamodules.pairs import StreamingPairDataModule
from datamodules.text_batches import PromptConfig
from lightning_modules import TextOnly
from lightning_modules.components.text_encoder import TextEncoderConfig


def child(batch_size: int, chunk: int | None, query_tokens: int, document_tokens: int, output: str) -> None:
    text_model = tiny_text_model()
    data = StreamingPairDataModule(
        text_model,
        prompts=PromptConfig(query_template="{query}"),
        max_query_length=query_tokens,
        max_document_length=document_tokens,
    )
    tokenizer = data.batches.tokenizer
    words, rng = vocabulary(tokenizer), random.Random(0)
    rows = [
        {
            "id": f"row{i}",
            "query": text_of_tokens(tokenizer, words, query_tokens, rng),
            "document": text_of_tokens(tokenizer, words, document_tokens, rng),
        }
        for i in range(batch_size)
    ]
    batch = data.batches.training_batch(rows)
    torch.manual_seed(0)
    model = TextOnly(TextEncoderConfig(text_model), matryoshka_dims=DIMS, gradient_chunk_size=chunk).train()
    before = peak_rss_mb()
    started = time.perf_counter()
    loss = model.training_loss(batch)
    loss.backward()
    seconds = time.perf_counter() - started
    peak = peak_rss_mb()
    torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, output)
    print(json.dumps({"before_mb": before, "peak_mb": peak, "seconds": seconds, "loss": float(loss)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--query-tokens", type=int, default=32)
    parser.add_argument("--document-tokens", type=int, default=256)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.batch_size, args.chunk_size or None, args.query_tokens, args.document_tokens, args.output)
        return

    tiny_text_model()  # built once here, not inside the measured children
    results, grads = {}, {}
    with tempfile.TemporaryDirectory() as directory:
        for name, chunk in (("whole batch", 0), (f"GradCache chunk {args.chunk}", args.chunk)):
            output = str(Path(directory) / f"grads-{chunk}.pt")
            common = ["--batch-size", str(args.batch_size), "--query-tokens", str(args.query_tokens)]
            common += ["--document-tokens", str(args.document_tokens)]
            results[name] = run_child(
                Path(__file__), [*common, "--chunk-size", str(chunk), "--output", output]
            )
            grads[name] = torch.load(output)
    (plain, plain_grads), (cached, cached_grads) = [(results[n], grads[n]) for n in results]
    diff = max(float((plain_grads[k] - cached_grads[k]).abs().max()) for k in plain_grads)
    scale = max(float(g.abs().max()) for g in plain_grads.values())
    print(f"machine: {machine()}")
    print(
        f"batch {args.batch_size}, queries {args.query_tokens} / documents {args.document_tokens} tokens, "
        f"tiny Qwen3 fully trained, dims {DIMS}"
    )
    print_table(
        "Peak resident memory of one forward + backward (each in a fresh process)",
        ["setting", "peak (MB)", "peak - before the step (MB)", "step (s)", "loss"],
        [
            [
                n,
                f"{r['peak_mb']:.0f}",
                f"{r['peak_mb'] - r['before_mb']:.0f}",
                f"{r['seconds']:.2f}",
                f"{r['loss']:.6f}",
            ]
            for n, r in results.items()
        ],
    )
    print(f"\npeak ratio GradCache / whole batch: {cached['peak_mb'] / plain['peak_mb']:.2f}x")
    print(
        "step-memory ratio (peak - before): "
        f"{(cached['peak_mb'] - cached['before_mb']) / (plain['peak_mb'] - plain['before_mb']):.2f}x"
    )
    print(
        f"max |gradient difference| = {diff:.2e} (largest gradient {scale:.2e}); {len(plain_grads)} tensors"
    )


if __name__ == "__main__":
    main()
