"""Speech-model inputs of a batch: w2v-BERT's own feature extractor vs the vectorized one.

``SeamlessM4TFeatureExtractor`` (w2v-BERT 2.0) computes its log-mel filterbanks one 10 ms frame at
a time in Python; ``datamodules.fast_features`` does the same arithmetic on all frames at once.
The data pipeline builds every training batch's inputs on the CPU, so this is per-step time the
model waits for (with ``num_workers: 0``) or a worker core spends. Same clips, side by side; the
outputs are compared too.

    python benchmarks/speech_features.py [--batch-size 64] [--seconds 2 30] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from common import machine, print_table, tiny_speech_model

from datamodules.fast_features import clip_inputs


def reference_inputs(extractor, waveforms: list[np.ndarray]) -> list[np.ndarray]:
    """The extractor called on each clip alone, keeping the rows its attention mask marks real."""
    rows = []
    for wave in waveforms:
        output = extractor(wave, sampling_rate=extractor.sampling_rate, return_attention_mask=True)
        mask = np.asarray(output["attention_mask"][0]).astype(bool)
        rows.append(np.asarray(output["input_features"][0])[mask])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, nargs="+", default=[2.0, 30.0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from transformers import AutoFeatureExtractor

    extractor = AutoFeatureExtractor.from_pretrained(tiny_speech_model())
    rng = np.random.default_rng(0)
    print(f"machine: {machine()}; batch {args.batch_size}, extractor {type(extractor).__name__}")
    rows = []
    for seconds in args.seconds:
        t = np.arange(int(seconds * extractor.sampling_rate)) / extractor.sampling_rate
        tones = [0.3 * np.sin(2 * np.pi * rng.uniform(150, 900) * t) for _ in range(args.batch_size)]
        clips = [(tone + 0.05 * rng.standard_normal(t.shape)).astype(np.float32) for tone in tones]
        reference_times, fast_times = [], []
        for _ in range(args.repeat):  # alternate, so drifts in machine load hit both sides
            start = time.perf_counter()
            reference = reference_inputs(extractor, clips)
            reference_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            fast = clip_inputs(extractor, clips)
            fast_times.append(time.perf_counter() - start)
        difference = max(float(np.abs(a - b).max()) for a, b in zip(reference, fast, strict=True))
        slow, quick = statistics.median(reference_times), statistics.median(fast_times)
        ratio = f"{slow / quick:.1f}x"
        rows.append([f"{seconds:g} s", f"{slow:.3f}", f"{quick:.3f}", ratio, f"{difference:.1e}"])
    print_table(
        "Speech inputs of one batch (median of the rounds)",
        ["clip", "extractor (s)", "vectorized (s)", "speed-up", "max |difference|"],
        rows,
    )


if __name__ == "__main__":
    main()
