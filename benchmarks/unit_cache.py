"""Unit fusion's training step with and without the unit cache (the frozen speech tower skipped for
clips seen before), on the demo's models, side by side: the second pass over the same clips.

    python benchmarks/unit_cache.py [--batch-size 32] [--seconds 3] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from common import DIMS, machine, print_table, tiny_speech_model, tiny_text_model
from transformers import AutoFeatureExtractor, AutoTokenizer

from datamodules.audio import pad_waveforms
from datamodules.text_batches import PromptConfig, TextBatchBuilder
from lightning_modules import UnitFusion
from lightning_modules.components.text_encoder import LoraSettings, TextEncoderConfig
from lightning_modules.components.unit_tokenizer import UnitCodebook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    text_model, speech_model = tiny_text_model(), tiny_speech_model()
    rng = np.random.default_rng(0)
    clips = [
        (0.1 * rng.standard_normal(int(args.seconds * 16000))).astype(np.float32)
        for _ in range(args.batch_size)
    ]
    text = TextBatchBuilder(AutoTokenizer.from_pretrained(text_model), PromptConfig(), 64, 64, {})
    batch = {
        "ids": [str(i) for i in range(args.batch_size)],
        "query_audio": pad_waveforms(AutoFeatureExtractor.from_pretrained(speech_model), clips),
        "prompt": text.prompt_tokens(["document_retrieval"] * args.batch_size),
        "document": text.documents([f"document {i}" for i in range(args.batch_size)]),
    }
    models, codebook = {}, None
    for name, cache in (("units computed", False), ("unit cache", True)):
        torch.manual_seed(0)
        model = UnitFusion(
            TextEncoderConfig(text_model, lora=LoraSettings(r=16, dropout=0.0)),
            {"pretrained_model_name_or_path": speech_model},
            units={"size": 256, "layer": 0, "cache": cache},
            matryoshka_dims=DIMS,
        ).train()
        if codebook is None:
            codebook = UnitCodebook(
                rng.normal(size=(256, model.speech_encoder.hidden_size)), model.unit_settings
            )
        model._use_codebook(codebook)
        models[name] = model

    def step(model):
        model.zero_grad()
        loss = model.training_loss(batch)
        loss.backward()
        return float(loss)

    times, losses = {name: [] for name in models}, {}
    for name, model in models.items():
        losses[name] = step(model)  # the first pass: the cache fills
    for _ in range(args.steps):  # alternating, so both see the same machine load
        for name, model in models.items():
            started = time.perf_counter()
            step(model)
            times[name].append(time.perf_counter() - started)
    print(f"machine: {machine()}")
    print(
        f"batch {args.batch_size}, clips of {args.seconds:g} s, demo models, 256 units of layer 0, LoRA r 16"
    )
    base = statistics.median(times["units computed"])
    print_table(
        "Unit fusion training step, clips seen before",
        ["setting", "step (s, median)", "speed-up", "first loss"],
        [
            [
                name,
                f"{statistics.median(t):.3f}",
                f"{base / statistics.median(t):.2f}x",
                f"{losses[name]:.6f}",
            ]
            for name, t in times.items()
        ],
    )


if __name__ == "__main__":
    main()
