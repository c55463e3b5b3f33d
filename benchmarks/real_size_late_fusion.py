"""(e) Real-size late fusion on a GPU: Qwen3-0.6B and HuBERT-base shapes, random weights, bf16.

The paper's recipe at its real sizes (nothing downloaded: the published configurations with random
weights): frozen 28-layer Qwen3 text tower, frozen HuBERT-base speech tower, the adapter trains.
Prints examples/s, peak GPU memory and model FLOPs utilization (FLOPs of one step counted with
``torch.utils.flop_counter``, divided by the step time and the GPU's peak dense bf16 rate), with
documents computed every step and read from the frozen-document cache, side by side.

    python benchmarks/real_size_late_fusion.py [--batch-size 64] [--document-tokens 512] [--seconds 3 10]
        [--peak-tflops 989]

``--layers 2 --device cpu`` runs the same code small, as a check without a GPU.
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
from common import REAL_ADAPTER, REAL_DIMS, machine, print_table, real_size_models, text_of_tokens, vocabulary
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoFeatureExtractor, AutoTokenizer

from datamodules.audio import pad_waveforms
from datamodules.text_batches import PromptConfig, TextBatchBuilder
from lightning_modules import LateFusion
from lightning_modules.document_cache import DocumentEmbeddingCache, fill_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--document-tokens", type=int, default=512)
    parser.add_argument("--seconds", type=float, nargs="+", default=[3.0, 10.0], help="speech query lengths")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200: 989)")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers, for a small check run")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = "bfloat16"

    with tempfile.TemporaryDirectory() as directory:
        text_dir, speech_dir = real_size_models(Path(directory), args.layers)
        model = LateFusion(
            text_encoder={"pretrained_model_name_or_path": text_dir, "dtype": dtype},
            speech_encoder={"pretrained_model_name_or_path": speech_dir, "dtype": dtype},
            adapter=REAL_ADAPTER,
            matryoshka_dims=REAL_DIMS,
        ).to(device)
        model.train()
        tokenizer = AutoTokenizer.from_pretrained(text_dir)
        text = TextBatchBuilder(tokenizer, PromptConfig(), 128, args.document_tokens, {})
        words, rng, wave_rng = vocabulary(tokenizer), random.Random(0), np.random.default_rng(0)
        extractor = AutoFeatureExtractor.from_pretrained(speech_dir)
        documents = [
            text_of_tokens(tokenizer, words, args.document_tokens, rng) for _ in range(args.batch_size)
        ]
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        cache = DocumentEmbeddingCache(Path(directory) / "cache", REAL_DIMS)
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
        fill_cache(cache, model, text.documents, documents, 32, autocast)

        def batch_of(seconds: float) -> dict:
            clips = [
                (wave_rng.standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)
                for _ in range(args.batch_size)
            ]
            batch = {
                "ids": [str(i) for i in range(args.batch_size)],
                "query_audio": pad_waveforms(extractor, clips),
                "prompt": text.prompt_tokens(["document_retrieval"] * args.batch_size),
                "document": text.documents(documents),
            }
            return {
                k: ({n: t.to(device) for n, t in v.items()} if isinstance(v, dict) else v)
                for k, v in batch.items()
            }

        def step(batch):
            optimizer.zero_grad()
            with autocast():
                loss = model.training_loss(batch)
            loss.backward()
            optimizer.step()

        def measure(batch) -> tuple[float, float, int]:
            """Median step seconds, peak GPU memory (GiB) and FLOPs of one step."""
            step(batch)  # warm-up
            with FlopCounterMode(display=False) as counter:
                step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(args.steps):
                started = time.perf_counter()
                step(batch)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            return statistics.median(times), peak, counter.get_total_flops()

        rows = []
        for speech_seconds in args.seconds:
            batch = batch_of(speech_seconds)
            for name, use_cache in (("documents computed", False), ("document cache", True)):
                model.document_cache = cache if use_cache else None
                seconds, peak, flops = measure(batch)
                rows.append(
                    [
                        f"{speech_seconds:g} s",
                        name,
                        f"{seconds:.3f}",
                        f"{args.batch_size / seconds:.1f}",
                        f"{peak:.1f}",
                        f"{flops / 1e12:.2f}",
                        f"{flops / seconds / (args.peak_tflops * 1e12):.1%}",
                    ]
                )

    print(f"machine: {machine(device.type)}")
    print(
        f"batch {args.batch_size}, documents {args.document_tokens} tokens, bf16 weights + autocast, "
        f"layers {args.layers or 'real'}, median of {args.steps} steps, "
        f"MFU against {args.peak_tflops:g} TFLOP/s"
    )
    print_table(
        "Real-size late fusion training step",
        ["speech", "setting", "step (s)", "examples/s", "peak GPU memory (GiB)", "model TFLOPs/step", "MFU"],
        rows,
    )


if __name__ == "__main__":
    main()
