"""The process's random generators as plain data, for checkpoints that resume the same run."""

from __future__ import annotations

import random

import numpy as np
import torch


def collect_random_states() -> dict:
    """Python, NumPy, torch CPU and (when present) every CUDA device's generator state."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    # Lists and tensors only: checkpoints are read with torch.load(weights_only=True).
    numpy_state = [name, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)]
    states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(states: dict) -> None:
    random.setstate(states["python"])
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
