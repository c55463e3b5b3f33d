"""Late-fusion training over one shuffle block of mixed-length clips: plain batches vs grouped by length.

``data.init_args.group_by_length`` sorts each shuffle block by clip duration, cuts it into
batches and serves them in random order. Both settings here train on the same rows (one block,
the same stream and seed), with the frozen-document cache on as in ``configs/late_fusion.yaml``,
so what differs is the padding of the speech query path (speech tower, adapter, LLM forward and
backward). Printed: the time to train on the whole block (alternating rounds, medians), and the
share of speech frames that are padding.

    python benchmarks/length_grouping.py [--batch-size 16] [--batches 8] [--seconds 3 30] [--rounds 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from common import DIMS, machine, print_table, text_of_tokens, tiny_speech_model, tiny_text_model, vocabulary
from common import wav_bytes as clip_bytes

from datamodules.audio import AudioSettings
from datamodules.lengths import clip_seconds
from datamodules.pairs import StreamingPairDataModule
from datamodules.streaming import ShuffledEpochStream
from lightning_modules import LateFusion
from lightning_modules.components.text_encoder import TextEncoderConfig
from lightning_modules.document_cache import DocumentEmbeddingCache, fill_cache


def block_batches(rows: list[dict], batch_size: int, grouped: bool) -> list[list[dict]]:
    """The block's batches as training would draw them (the stream the datamodule builds)."""
    import datasets

    source = datasets.Dataset.from_list(rows).to_iterable_dataset()
    if grouped:
        length_of = partial(clip_seconds, column="audio")
        grouping = {"length_of": length_of, "batch_size": batch_size}
        return list(ShuffledEpochStream(source, block_size=len(rows), passes=1, **grouping))
    ordered = list(ShuffledEpochStream(source, block_size=len(rows), passes=1))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def padding_share(batches: list[dict]) -> float:
    lengths = [b["query_audio"]["attention_mask"].sum(dim=1) for b in batches]
    padded = sum(len(n) * int(n.max()) for n in lengths)
    return 1 - sum(int(n.sum()) for n in lengths) / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=8, help="batches in the block")
    parser.add_argument("--seconds", type=float, nargs=2, default=[3.0, 30.0], help="clip range (uniform)")
    parser.add_argument("--document-tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    text_model, speech_model = tiny_text_model(), tiny_speech_model()
    data = StreamingPairDataModule(
        text_model,
        audio=AudioSettings(feature_extractor=speech_model, min_duration=0.5, max_duration=args.seconds[1]),
        max_query_length=64,
        max_document_length=args.document_tokens,
    )
    tokenizer = data.batches.text.tokenizer
    words, rng, wave_rng = vocabulary(tokenizer), random.Random(0), np.random.default_rng(0)
    count = args.batch_size * args.batches
    rows = [
        {
            "id": f"row{i}",
            "query": " ".join(rng.choice(words) for _ in range(4)),
            "document": text_of_tokens(tokenizer, words, args.document_tokens, rng),
            "audio": {"bytes": clip_bytes(rng.uniform(*args.seconds), wave_rng), "path": None},
        }
        for i in range(count)
    ]
    torch.manual_seed(0)
    model = LateFusion(
        TextEncoderConfig(text_model),
        {"pretrained_model_name_or_path": speech_model},
        adapter={"conv_channels": 1024},
        matryoshka_dims=DIMS,
    ).train()
    with tempfile.TemporaryDirectory() as directory:
        model.document_cache = DocumentEmbeddingCache(Path(directory) / "cache", DIMS)
        fill_cache(model.document_cache, model, data.tokenize_documents, [row["document"] for row in rows])
        settings = {
            name: [data.batches.training_batch(b) for b in block_batches(rows, args.batch_size, grouped)]
            for name, grouped in (("plain", False), ("grouped by length", True))
        }
        assert all(sum(len(b["ids"]) for b in batches) == count for batches in settings.values())
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def train_on(batches) -> float:
            started = time.perf_counter()
            for batch in batches:
                optimizer.zero_grad()
                model.training_loss(batch).backward()
                optimizer.step()
            return time.perf_counter() - started

        train_on(settings["plain"][:1])  # warm-up
        times = {name: [] for name in settings}
        for _ in range(args.rounds):  # alternating, so both see the same machine state
            for name, batches in settings.items():
                times[name].append(train_on(batches))

    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"machine: {machine()}")
    print(
        f"{count} rows (one shuffle block, {args.batches} batches of {args.batch_size}), clips uniform in "
        f"{args.seconds[0]:g}-{args.seconds[1]:g} s, documents of {args.document_tokens} tokens from the "
        f"document cache; demo's tiny LLM and w2v-BERT (frozen), adapter 1024 channels; {args.rounds} rounds"
    )
    print_table(
        "Late-fusion training on one block (forward + backward + AdamW per batch)",
        ["batches", "padding share of speech frames", "time for the block (s)", "speed-up"],
        [
            [name, f"{padding_share(settings[name]):.1%}", f"{medians[name]:.2f}",
             f"{medians['plain'] / medians[name]:.2f}x"]
            for name in settings
        ],
    )  # fmt: skip


if __name__ == "__main__":
    main()
