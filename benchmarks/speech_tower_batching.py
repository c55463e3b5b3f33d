"""A GroupNorm speech tower (HuBERT-base shapes): one clip at a time vs batched with per-clip statistics.

HuBERT-base normalizes its first convolution's output over the whole clip, so a batch either runs
one clip at a time (a forward per clip) or batched with that norm's statistics taken per clip
(``lightning_modules/components/clip_group_norm.py``; the default off CPU). Both give each clip's
own encoding; this prints their time side by side (alternating rounds), the largest difference
between them, and the operators each dispatches per batch (a proxy for kernel launches on a GPU:
most operators launch one, views none, some several), which a forward per clip multiplies by the
batch size.

    python benchmarks/speech_tower_batching.py [--batch-size 16] [--seconds 3 10] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
from common import machine, print_table
from torch.utils._python_dispatch import TorchDispatchMode

from datamodules.audio import pad_waveforms
from lightning_modules.components.speech_encoder import SpeechEncoder, SpeechEncoderConfig


class CountOperators(TorchDispatchMode):
    """Counts the operators that reach the kernels (after autograd): about the launches on a GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seconds", type=float, nargs=2, default=[3.0, 10.0], help="clip length range")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="weights dtype (bfloat16 on a GPU, as the recipe)")
    args = parser.parse_args()
    device = torch.device(args.device)
    from transformers import AutoModel, HubertConfig, Wav2Vec2FeatureExtractor

    rng = np.random.default_rng(0)
    low, high = (int(s * 16000) for s in args.seconds)
    mixed = [int(n) for n in rng.integers(low, high, args.batch_size)]
    shapes = {
        f"{args.seconds[0]:g}-{args.seconds[1]:g} s": mixed,
        f"all {args.seconds[0]:g} s": [low] * args.batch_size,
    }
    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        AutoModel.from_config(HubertConfig()).save_pretrained(directory)  # HuBERT-base, random weights
        encoders = {}
        for name, per_clip in (("one clip at a time", True), ("batched, per-clip statistics", False)):
            config = SpeechEncoderConfig(directory, per_utterance=per_clip, dtype=args.dtype)
            encoders[name] = SpeechEncoder(config).to(device)

    def run(encoder, batch):
        output = encoder(**batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return output

    rows = []
    for shape, lengths in shapes.items():
        clips = [rng.standard_normal(n).astype(np.float32) for n in lengths]
        batch = {k: v.to(device) for k, v in pad_waveforms(Wav2Vec2FeatureExtractor(), clips).items()}
        times = {name: [] for name in encoders}
        with torch.no_grad():
            outputs = {name: run(encoder, batch) for name, encoder in encoders.items()}  # warm-up
            for _ in range(args.rounds):  # alternate, so drifts in machine load hit both sides
                for name, encoder in encoders.items():
                    started = time.perf_counter()
                    run(encoder, batch)
                    times[name].append(time.perf_counter() - started)
            operators = {}
            for name, encoder in encoders.items():
                with CountOperators() as counter:
                    encoder(**batch)
                operators[name] = counter.count
        (one, batched) = (outputs[name] for name in encoders)
        frames = one.frame_mask.sum(dim=1).tolist()
        difference = max(
            float((a[row, :n] - b[row, :n]).abs().max() / a.abs().max())
            for a, b in zip(one.hidden_states, batched.hidden_states, strict=True)
            for row, n in enumerate(frames)
        )
        (slow, quick) = (statistics.median(times[name]) for name in encoders)
        rows.append(
            [shape, f"{slow:.3f}", f"{quick:.3f}", f"{slow / quick:.2f}x"]
            + [str(operators[name]) for name in encoders]
            + [f"{difference:.1e}"]
        )
    where = torch.cuda.get_device_name() if device.type == "cuda" else machine()
    print(f"machine: {where}; batch {args.batch_size}, weights {args.dtype or 'float32'}")
    print_table(
        "HuBERT-base forward of one batch, every layer's hidden states (median of the rounds)",
        [
            "clips",
            "one at a time (s)",
            "batched (s)",
            "speed-up",
            "operators, one at a time",
            "operators, batched",
            "max difference / max value",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
