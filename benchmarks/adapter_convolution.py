"""The adapter's strided convolution on CPU: oneDNN's Conv1d vs the unfolded-windows matrix product.

``ConvDownsampler.convolve`` runs on CPU as one product over the unfolded windows (same weights,
same sums); this times forward + backward of both, alternating, at three shapes: the demo's
adapter, the document-cache benchmark's, and the real recipe's (12 concatenated HuBERT-base
layers, 1024 channels), and checks that they agree.

    python benchmarks/adapter_convolution.py [--repeat 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import machine, print_table

from lightning_modules.components.adapters import ConvDownsampler

SHAPES = {  # name: batch, frames, input channels, output channels, kernel, stride
    "demo (3 s clips, 3 layers x 128)": (64, 150, 384, 256, 7, 4),
    "document-cache benchmark (4 s)": (16, 200, 256, 1024, 3, 2),
    "real recipe (4 s, 12 layers x 768)": (16, 200, 9216, 1024, 3, 2),
}


def forward_backward(function, frames: torch.Tensor) -> float:
    started = time.perf_counter()
    function(frames).sum().backward()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=8)
    args = parser.parse_args()
    rows = []
    for name, (batch, frames, inputs, channels, kernel, stride) in SHAPES.items():
        torch.manual_seed(0)
        downsampler = ConvDownsampler(inputs, channels, kernel, stride)
        x = torch.randn(batch, frames, inputs, requires_grad=True)  # the LayerNorm's output needs a gradient

        def convolution(x, d=downsampler):
            return d.conv(x.transpose(1, 2)).transpose(1, 2)

        functions = {"Conv1d": convolution, "product": downsampler.convolve}
        with torch.no_grad():
            difference = (convolution(x) - downsampler.convolve(x)).abs().max().item()
        times = {key: [] for key in functions}
        for _ in range(args.repeat + 1):  # the first round warms up
            for key, function in functions.items():
                times[key].append(forward_backward(function, x))
        medians = {key: statistics.median(values[1:]) for key, values in times.items()}
        rows.append(
            [
                name,
                f"{medians['Conv1d'] * 1000:.1f}",
                f"{medians['product'] * 1000:.1f}",
                f"{medians['Conv1d'] / medians['product']:.2f}x",
                f"{difference:.1e}",
            ]
        )
    print(f"machine: {machine()}")
    print_table(
        "Adapter convolution, forward + backward (median of alternating rounds)",
        ["shape", "Conv1d (ms)", "unfolded product (ms)", "speed-up", "max |output difference|"],
        rows,
    )


if __name__ == "__main__":
    main()
