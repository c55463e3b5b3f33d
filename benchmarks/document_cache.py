"""(b) Late-fusion training step with and without the frozen-document cache.

The paper's late-fusion setting: frozen text LLM and speech encoder, the adapter trains, documents
of 512 tokens. Without the cache every step runs the LLM over the batch's documents; with it,
they are read from disk (filled once beforehand: that one-time cost is printed too). Same model,
same batches, measured side by side in one process; the loss is checked equal first. The cache
removes the document forward; what remains is the speech query's path (speech tower, adapter,
LLM forward and backward), which grows with the clip, so the speed-up is shown per clip length.

    python benchmarks/document_cache.py [--batch-size 16] [--document-tokens 512] [--seconds 1 2 3 4]
        [--conv-channels 1024]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    late_fusion_setup,
    machine,
    print_table,
    text_of_tokens,
    vocabulary,
    wav_bytes,
)

from lightning_modules.document_cache import DocumentEmbeddingCache, fill_cache

SETTINGS = {  # name: (document cache, cached prompt states)
    "without cache": (False, True),
    "with cache": (True, True),
    "with cache, prompts in full": (True, False),
}


def measure(model, data, cache, rows, batch_size: int, steps: int) -> dict:
    """Median step time with and without the cache on the same batches, and the loss difference.

    A third setting runs the task prompt through the LLM at every step (cached prompt states off,
    ``components/prompt_states.py``), to show what that part of the query path costs.
    """
    batches = [data.batches.training_batch(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
    assert all(len(b["ids"]) == batch_size for b in batches)
    prompt_states = model.prompt_state_cache

    def configure(name):
        documents, prompts = SETTINGS[name]
        model.document_cache = cache if documents else None
        model.prompt_state_cache = prompt_states if prompts else None

    with torch.no_grad():
        losses = {}
        for name in SETTINGS:
            configure(name)
            losses[name] = model.training_loss(batches[0])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch):
        optimizer.zero_grad()
        model.training_loss(batch).backward()
        optimizer.step()

    times = {name: [] for name in SETTINGS}
    step(batches[0])  # warm-up
    for batch in batches[1 : steps + 1]:  # alternating, so all see the same machine state
        for name in times:
            configure(name)
            started = time.perf_counter()
            step(batch)
            times[name].append(time.perf_counter() - started)
    configure("without cache")
    medians = {name: statistics.median(values) for name, values in times.items()}
    reference = losses["without cache"]
    return {
        **medians,
        "speed-up": medians["without cache"] / medians["with cache"],
        "loss diff": float((losses["with cache"] - reference).abs()),
        "prompt loss diff": float((losses["with cache, prompts in full"] - reference).abs()),
        "document tokens": int(batches[0]["document"]["attention_mask"].sum(dim=1).min()),
        "speech tokens": int(model.speech_tokens(batches[0])[1].sum(dim=1).max()),
        "prompt tokens": int(batches[0]["prompt"]["attention_mask"].sum(dim=1).max()),
    }


def run(args, model, data, directory: str):
    tokenizer = data.batches.text.tokenizer
    words, rng, wave_rng = vocabulary(tokenizer), random.Random(0), np.random.default_rng(0)
    documents = [
        text_of_tokens(tokenizer, words, args.document_tokens, rng)
        for _ in range(args.batch_size * (args.steps + 1))
    ]
    results = {}
    cache = DocumentEmbeddingCache(Path(directory) / "cache", model.matryoshka_dims)
    started = time.perf_counter()
    filled = fill_cache(cache, model, data.tokenize_documents, documents, 64)
    fill_seconds = time.perf_counter() - started
    for seconds in args.seconds:
        rows = [
            {
                "id": f"row{i}",
                "query": " ".join(rng.choice(words) for _ in range(4)),
                "document": document,
                "audio": {"bytes": wav_bytes(seconds, wave_rng), "path": None},
            }
            for i, document in enumerate(documents)
        ]
        results[seconds] = measure(model, data, cache, rows, args.batch_size, args.steps)
    return results, filled, fill_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--document-tokens", type=int, default=512)
    parser.add_argument(
        "--seconds", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0], help="query clip lengths"
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument(
        "--conv-channels",
        type=int,
        default=1024,
        help="adapter width (1024: the real recipe's; the tiny LLM's hidden size is 256)",
    )
    parser.add_argument(
        "--real-size",
        action="store_true",
        help="the real recipe's shapes instead of the demo's: Qwen3-0.6B and HuBERT-base with random "
        "weights, float32, dims 128-1024, its adapter (--conv-channels is ignored)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        model, data = late_fusion_setup(
            Path(directory), args.real_size, args.document_tokens, args.conv_channels
        )
        dims = model.matryoshka_dims
        results, filled, fill_seconds = run(args, model, data, directory)

    print(f"machine: {machine()}")
    print(
        f"batch {args.batch_size}, documents of {args.document_tokens} tokens, {args.steps} steps per "
        f"setting, dims {dims}; "
        + (
            "Qwen3-0.6B and HuBERT-base shapes, random weights, float32 (frozen); the recipe's adapter"
            if args.real_size
            else f"tiny demo LLM and speech tower (frozen); adapter stride 2, {args.conv_channels} channels"
        )
    )
    print_table(
        "Late-fusion training step (forward + backward + AdamW), frozen document tower",
        ["query clip", "prompt + speech tokens", "step without cache (s)", "step with cache (s)",
         "speed-up", "\\|loss diff\\|", "with cache, prompts in full (s)", "\\|loss diff\\|"],
        [
            [f"{seconds:g} s", f"{r['prompt tokens']} + {r['speech tokens']}", f"{r['without cache']:.3f}",
             f"{r['with cache']:.3f}", f"{r['speed-up']:.2f}x", f"{r['loss diff']:.1e}",
             f"{r['with cache, prompts in full']:.3f}", f"{r['prompt loss diff']:.1e}"]
            for seconds, r in results.items()
        ],
    )  # fmt: skip
    print(f"\none-time fill: {filled} documents of {args.document_tokens} tokens in {fill_seconds:.2f} s")


if __name__ == "__main__":
    main()
