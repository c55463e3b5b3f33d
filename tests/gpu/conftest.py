"""The GPU checks (``pytest -m gpu``): each runs on CUDA, and is skipped with a reason without it.

``GPU_CHECK_ON_CPU=1`` runs the same checks on the CPU (bf16 autocast exists there too): the dry
run of ``benchmarks/gpu_check.sh`` uses it, so the checks themselves are tested on a machine
without a GPU. ``GPU_CHECK_FIGURES=FILE`` appends every measured error and its bound to FILE
(JSON lines), which the device script turns into its report.
"""

from __future__ import annotations

import json
import os

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("GPU_CHECK_ON_CPU") == "1":
        return torch.device("cpu")
    pytest.skip("needs a CUDA device, and this machine has none (GPU_CHECK_ON_CPU=1 runs it on the CPU)")


@pytest.fixture(autouse=True)
def exact_float32(device):
    """float32 products in float32: TF32 (cuDNN convolutions use it by default) rounds inputs to 10
    bits, which would blur the float32 reference the bf16 runs are measured against."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.fixture
def figure(request, device):
    """``figure(name, measured, bound)``: asserts measured <= bound and records both."""
    path = os.environ.get("GPU_CHECK_FIGURES")

    def record(name: str, measured: float, bound: float | None = None) -> None:
        if path:
            entry = {"test": request.node.name, "figure": name, "measured": measured, "bound": bound}
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry | {"device": device.type}) + "\n")
        if bound is not None:
            assert measured <= bound, f"{name}: {measured:.3g} > bound {bound:.3g}"

    return record
