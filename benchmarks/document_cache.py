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

import numpy as np
import torch
from common import (
    DIMS,
    machine,
    print_table,
    text_of_tokens,
    tiny_speech_model,
    tiny_text_model,
    vocabulary,
    wav_bytes,
)

from callbacks.document_cache import fill_cache
from datamodules.audio import AudioSettings
from datamodules.pairs import StreamingPairDataModule
from lightning_modules import LateFusion
from lightning_modules.components.text_encoder import TextEncoderConfig
from lightning_modules.document_cache import DocumentEmbeddingCache


def measure(model, data, cache, rows, batch_size: int, steps: int) -> dict:
    """Median step time with and without the cache on the same batches, and the loss difference."""
    batches = [data.batches.training_batch(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
    assert all(len(b["ids"]) == batch_size for b in batches)
    with torch.no_grad():
        computed_loss = model.training_loss(batches[0])
        model.document_cache = cache
        cached_loss = model.training_loss(batches[0])
        model.document_cache = None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch):
        optimizer.zero_grad()
        model.training_loss(batch).backward()
        optimizer.step()

    times = {"without cache": [], "with cache": []}
    step(batches[0])  # warm-up
    for batch in batches[1 : steps + 1]:  # alternating, so both see the same machine state
        for name in times:
            model.document_cache = cache if name == "with cache" else None
            started = time.perf_counter()
            step(batch)
            times[name].append(time.perf_counter() - started)
    model.document_cache = None
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        **medians,
        "speed-up": medians["without cache"] / medians["with cache"],
        "loss diff": float((computed_loss - cached_loss).abs()),
        "document tokens": int(batches[0]["document"]["attention_mask"].sum(dim=1).min()),
        "speech tokens": int(model.speech_tokens(batches[0])[1].sum(dim=1).max()),
    }


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
    args = parser.parse_args()

    text_model, speech_model = tiny_text_model(), tiny_speech_model()
    data = StreamingPairDataModule(
        text_model,
        audio=AudioSettings(feature_extractor=speech_model, min_duration=0.5),
        max_query_length=64,
        max_document_length=args.document_tokens,
    )
    tokenizer = data.batches.text.tokenizer
    words, rng, wave_rng = vocabulary(tokenizer), random.Random(0), np.random.default_rng(0)
    documents = [
        text_of_tokens(tokenizer, words, args.document_tokens, rng)
        for _ in range(args.batch_size * (args.steps + 1))
    ]
    torch.manual_seed(0)
    model = LateFusion(
        TextEncoderConfig(text_model),  # frozen (the paper's recipe): the adapter trains
        {"pretrained_model_name_or_path": speech_model},
        adapter={"conv_channels": args.conv_channels},
        matryoshka_dims=DIMS,
    ).train()
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        cache = DocumentEmbeddingCache(directory, DIMS)
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

    print(f"machine: {machine()}")
    print(
        f"batch {args.batch_size}, documents of {args.document_tokens} tokens, {args.steps} steps per "
        f"setting, dims {DIMS}; tiny demo LLM (frozen) and speech tower (frozen), adapter stride 2, "
        f"{args.conv_channels} channels"
    )
    print_table(
        "Late-fusion training step (forward + backward + AdamW), frozen document tower",
        ["query clip", "speech tokens", "step without cache (s)", "step with cache (s)", "speed-up",
         "|loss diff|"],
        [
            [f"{seconds:g} s", r["speech tokens"], f"{r['without cache']:.3f}", f"{r['with cache']:.3f}",
             f"{r['speed-up']:.2f}x", f"{r['loss diff']:.1e}"]
            for seconds, r in results.items()
        ],
    )  # fmt: skip
    print(f"\none-time fill: {filled} documents of {args.document_tokens} tokens in {fill_seconds:.2f} s")


if __name__ == "__main__":
    main()
