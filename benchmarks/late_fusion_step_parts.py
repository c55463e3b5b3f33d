"""Where a late-fusion training step spends its time, part by part, per query clip length.

The parts of one step on a batch: the frozen speech tower's forward (no gradient), the adapter's
forward, the frozen LLM's forward over the query (prompt states cached, as in training), the
backward of both, and the documents' forward (no gradient: the part the document cache removes).
Each part is timed on its own, in training's order, best of ``--repeats`` after a warm-up; the
LLM's parts also print their arithmetic rate (2 x non-embedding weights x tokens: attention left
out, and the pooled final layer's saving too, ~3.5 % of Qwen3-0.6B's weights), which shows
whether a part is bound by arithmetic or by overhead. The last column is the document cache's
ceiling, 1 + documents / query path, a second estimate of ``document_cache.py``'s measured ratio.

    python benchmarks/late_fusion_step_parts.py [--real-size] [--seconds 3 5] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import random
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

from lightning_modules import LateFusion

PARTS = ["speech tower", "adapter", "LLM forward", "backward", "documents"]


def time_parts(model: LateFusion, batch: dict) -> tuple[dict[str, float], int]:
    """One step's parts, each timed alone (seconds), and the tokens the LLM ran the queries over
    (after their cached prompt: speech tokens + end tokens)."""
    times = {}
    started = time.perf_counter()
    with torch.no_grad():
        states = model.speech_encoder(**batch["query_audio"])
    times["speech tower"] = time.perf_counter() - started

    started = time.perf_counter()
    speech = model.adapter(states.hidden_states, states.frame_mask, model.text_encoder.embedding_table())
    times["adapter"] = time.perf_counter() - started

    # The query's LLM part exactly as training runs it, with the adapter's output already made.
    model.speech_tokens = lambda _batch: speech
    try:
        started = time.perf_counter()
        queries = model.embed_queries(batch)
        times["LLM forward"] = time.perf_counter() - started
    finally:
        del model.speech_tokens  # back to the class's method

    # In training's order and grad mode: the documents after the query's forward, its graph alive.
    started = time.perf_counter()
    model.embed_documents(batch)
    times["documents"] = time.perf_counter() - started

    started = time.perf_counter()
    sum(embedding.sum() for embedding in queries.values()).backward()
    times["backward"] = time.perf_counter() - started
    _, speech_mask = speech
    return times, int(speech_mask.sum()) + speech_mask.shape[0] * len(model.closing_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--document-tokens", type=int, default=512)
    parser.add_argument("--seconds", type=float, nargs="+", default=[3.0, 5.0], help="query clip lengths")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--real-size",
        action="store_true",
        help="Qwen3-0.6B and HuBERT-base shapes with random weights and the recipe's adapter "
        "(default: the demo's tiny models)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        model, data = late_fusion_setup(Path(directory), args.real_size, args.document_tokens)
        tokenizer = data.batches.text.tokenizer
        words, rng, wave_rng = vocabulary(tokenizer), random.Random(0), np.random.default_rng(0)
        weights = sum(p.numel() for p in model.text_encoder.parameters())
        weights -= model.text_encoder.embedding_table().numel()

        rows = []
        for seconds in args.seconds:
            batch = data.batches.training_batch(
                [
                    {
                        "id": f"row{i}",
                        "query": " ".join(rng.choice(words) for _ in range(4)),
                        "document": text_of_tokens(tokenizer, words, args.document_tokens, rng),
                        "audio": {"bytes": wav_bytes(seconds, wave_rng), "path": None},
                    }
                    for i in range(args.batch_size)
                ]
            )
            time_parts(model, batch)  # warm-up
            runs = [time_parts(model, batch) for _ in range(args.repeats)]
            best = {part: min(times[part] for times, _ in runs) for part in PARTS}
            query_tokens = runs[0][1]
            document_tokens = int(batch["document"]["attention_mask"].sum())
            query_path = sum(best[part] for part in PARTS if part != "documents")
            rows.append(
                [f"{seconds:g} s"]
                + [f"{best[part]:.3f}" for part in PARTS]
                + [
                    f"{2 * weights * query_tokens / best['LLM forward'] / 1e9:.0f}",
                    f"{2 * weights * document_tokens / best['documents'] / 1e9:.0f}",
                    f"{1 + best['documents'] / query_path:.2f}x",
                ]
            )

    print(f"machine: {machine()}")
    print(
        f"batch {args.batch_size}, documents of {args.document_tokens} tokens, best of {args.repeats}; "
        + ("Qwen3-0.6B and HuBERT-base shapes, float32" if args.real_size else "the demo's tiny models")
        + f", LLM non-embedding weights {weights / 1e6:.1f} M"
    )
    print_table(
        "Late-fusion training step, part by part (s)",
        ["query clip", *PARTS, "LLM forward GFLOP/s", "documents GFLOP/s", "cache ceiling"],
        rows,
    )


if __name__ == "__main__":
    main()
