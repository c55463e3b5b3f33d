"""(b) Late-fusion training step with and without the frozen-document cache.

The paper's late-fusion setting: frozen text LLM and speech encoder, the adapter trains, documents
of 512 tokens. Without the cache every step runs the LLM over the batch's documents; with it,
they are read from disk (filled once beforehand: that one-time cost is printed too). Same model,
same batches, measured side by side in one process; the loss is checked equal first.

    python benchmarks/document_cache.py [--batch-size 16] [--document-tokens 512] [--steps 8]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--document-tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
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
    rows = [
        {
            "id": f"row{i}",
            "query": " ".join(rng.choice(words) for _ in range(4)),
            "document": text_of_tokens(tokenizer, words, args.document_tokens, rng),
            "audio": {"bytes": wav_bytes(rng.uniform(1.5, 3.0), wave_rng), "path": None},
        }
        for i in range(args.batch_size * (args.steps + 1))
    ]
    batches = [
        data.batches.training_batch(rows[i : i + args.batch_size])
        for i in range(0, len(rows), args.batch_size)
    ]
    assert all(len(b["ids"]) == args.batch_size for b in batches)
    lengths = batches[0]["document"]["attention_mask"].sum(dim=1)
    torch.manual_seed(0)
    model = LateFusion(
        TextEncoderConfig(text_model),  # frozen (the paper's recipe): the adapter trains
        {"pretrained_model_name_or_path": speech_model},
        matryoshka_dims=DIMS,
    ).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    with tempfile.TemporaryDirectory() as directory:
        cache = DocumentEmbeddingCache(directory, DIMS)
        started = time.perf_counter()
        filled = fill_cache(cache, model, data.tokenize_documents, [r["document"] for r in rows], 64)
        fill_seconds = time.perf_counter() - started

        with torch.no_grad():
            computed_loss = model.training_loss(batches[0])
            model.document_cache = cache
            cached_loss = model.training_loss(batches[0])
            model.document_cache = None
        loss_diff = float((computed_loss - cached_loss).abs())

        def step(batch):
            optimizer.zero_grad()
            model.training_loss(batch).backward()
            optimizer.step()

        times = {"without cache": [], "with cache": []}
        step(batches[0])  # warm-up
        for batch in batches[1:]:  # alternating, so both see the same machine state
            for name in times:
                model.document_cache = cache if name == "with cache" else None
                started = time.perf_counter()
                step(batch)
                times[name].append(time.perf_counter() - started)
        model.document_cache = None

    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"machine: {machine()}")
    print(
        f"batch {args.batch_size}, documents of {int(lengths.min())}-{int(lengths.max())} tokens, "
        f"{args.steps} steps each, dims {DIMS}"
    )
    print_table(
        "Late-fusion training step (forward + backward + AdamW), frozen document tower",
        ["setting", "median step (s)", "examples/s"],
        [[name, f"{m:.3f}", f"{args.batch_size / m:.1f}"] for name, m in medians.items()],
    )
    print(f"\nspeed-up with the cache: {medians['without cache'] / medians['with cache']:.2f}x")
    print(f"|loss with cache - loss without| = {loss_diff:.2e} (loss {float(computed_loss):.4f})")
    print(f"one-time fill: {filled} documents in {fill_seconds:.2f} s")


if __name__ == "__main__":
    main()
