"""Gradient-cached embeddings (GradCache, Gao et al. 2021): contrastive batches larger than memory.

1. Embed the batch chunk by chunk without a graph.
2. The caller computes the loss on the full batch (every negative, cross-device ones included);
   its backward stops at the embeddings and hands their gradient to step 3.
3. Per chunk, the forward runs again with a graph and that chunk's slice of the embedding
   gradient is backpropagated into the trainable parameters.

Each chunk also drops the columns that are padding in all its rows (``trim_padding``), so a chunk
of short rows does not pay for the batch's longest one.

Peak activation memory is one chunk's instead of the whole batch's, and the parameter gradients
equal the full-batch ones: each chunk's random state is replayed (torch's and NumPy's, from which
transformers draws SpecAugment masks), so dropout and SpecAugment draw the same masks, and the
autocast state of the step is re-entered (backward runs outside Lightning's autocast).
The parameters receive their gradient once, from this function's backward, so DDP's hooks fire
once per parameter as in a plain step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from lightning_modules.components.matryoshka import dims_side_by_side, ordered_keys, split_dims


def batch_rows(batch, start: int, stop: int, rows: int):
    """Rows ``start:stop`` of every tensor of a (nested) batch whose first dim is ``rows``.

    Non-tensor values (ids, names) are kept whole: the embedding functions read tensors only.
    """
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() and batch.shape[0] == rows else batch
    if isinstance(batch, Mapping):
        return {key: batch_rows(value, start, stop, rows) for key, value in batch.items()}
    return batch


def trim_padding(batch):
    """Drops the columns that are padding in every row, in each (nested) dict with an attention_mask.

    A chunk of short rows cut from a batch padded to its longest row keeps that padding; the
    models ignore masked positions (padding invariance is tested per model), so computing them is
    wasted work, and a chunk then costs what its own longest row costs. Every tensor of the dict
    whose first two dims match the mask's ``[rows, length]`` is cut to the span of real columns
    (left, right or no padding alike); other tensors are kept whole, so a layout with time
    elsewhere (channel-first features) would need its own rule here.
    """
    if not isinstance(batch, Mapping):
        return batch
    trimmed = {key: trim_padding(value) for key, value in batch.items()}
    mask = trimmed.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[1] == 0:
        return trimmed
    real = torch.nonzero(mask.bool().any(dim=0)).flatten()
    if len(real) == 0:
        return trimmed
    first, last = int(real[0]), int(real[-1]) + 1
    if first == 0 and last == mask.shape[1]:
        return trimmed
    return {
        key: value[:, first:last]
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == mask.shape
        else value
        for key, value in trimmed.items()
    }


def chunk_rows(batch, start: int, stop: int, rows: int):
    """Rows ``start:stop`` of the batch, without the columns that are padding in all of them."""
    return trim_padding(batch_rows(batch, start, stop, rows))


class _ChunkState:
    """What re-running one chunk needs: its rows and the random state its first run started from."""

    def __init__(self, batch: Mapping, start: int, stop: int, device: torch.device):
        self.start, self.stop = start, stop
        # Views of the batch's rows, trimmed once for both runs (finding the real columns syncs a
        # GPU with the host).
        self.batch = batch
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        # transformers draws wav2vec2/HuBERT/w2v-BERT SpecAugment masks with NumPy's global generator.
        self.numpy_rng = np.random.get_state()


class _ReplayChunks(torch.autograd.Function):
    """Identity on the no-graph embeddings; backward turns their gradient into parameter gradients."""

    @staticmethod
    def forward(ctx, replay: Callable, embeddings: torch.Tensor, *parameters: torch.Tensor):
        ctx.replay = replay
        ctx.parameters = parameters
        return embeddings.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (None, None, *ctx.replay(grad, ctx.parameters))


def grad_cached_embeddings(
    embed: Callable[[Mapping], Mapping[int, torch.Tensor]],
    batch: Mapping,
    rows: int,
    chunk_size: int,
    parameters: list[torch.Tensor],
) -> dict[int, torch.Tensor]:
    """``embed(batch)`` computed ``chunk_size`` rows at a time, with GradCache's chunked backward.

    ``parameters``: the trainable parameters ``embed`` may use (those that get gradients).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    device = next((p.device for p in parameters), torch.device("cpu"))
    autocast_device = device.type if device.type in ("cuda", "cpu") else "cpu"
    autocast = {
        "device_type": autocast_device,
        "enabled": torch.is_autocast_enabled(autocast_device),
        "dtype": torch.get_autocast_dtype(autocast_device),
    }
    chunks, outputs = [], []
    with torch.no_grad():
        for start in range(0, rows, chunk_size):
            stop = min(start + chunk_size, rows)
            chunks.append(_ChunkState(chunk_rows(batch, start, stop, rows), start, stop, device))
            outputs.append(embed(chunks[-1].batch))
    dims = ordered_keys(outputs[0])  # dims, and (layer, dim) exits when the model has them
    flat = torch.cat([dims_side_by_side(output) for output in outputs], dim=0)

    def replay(grad: torch.Tensor, params: tuple[torch.Tensor, ...]) -> list[torch.Tensor | None]:
        totals: list[torch.Tensor | None] = [None] * len(params)
        devices = [device] if device.type == "cuda" else []
        numpy_state = np.random.get_state()
        for chunk in chunks:
            with torch.random.fork_rng(devices=devices), torch.enable_grad(), torch.autocast(**autocast):
                torch.set_rng_state(chunk.cpu_rng)
                if chunk.cuda_rng is not None:
                    torch.cuda.set_rng_state(chunk.cuda_rng, device)
                np.random.set_state(chunk.numpy_rng)
                output = dims_side_by_side(embed(chunk.batch))
                grads = torch.autograd.grad(
                    output, params, grad_outputs=grad[chunk.start : chunk.stop], allow_unused=True
                )
            for i, value in enumerate(grads):
                if value is not None:
                    totals[i] = value if totals[i] is None else totals[i] + value
        np.random.set_state(numpy_state)  # as fork_rng does for torch's generators
        return totals

    return split_dims(_ReplayChunks.apply(replay, flat, *parameters), dims)


def chunked_no_grad(
    embed: Callable[[Mapping], Mapping[int, torch.Tensor]], batch: Mapping, rows: int, chunk_size: int
) -> dict[int, torch.Tensor]:
    """``embed(batch)`` without a graph, ``chunk_size`` rows at a time (a frozen tower's side)."""
    with torch.no_grad():
        outputs = [
            embed(chunk_rows(batch, start, min(start + chunk_size, rows), rows))
            for start in range(0, rows, chunk_size)
        ]
    return {dim: torch.cat([output[dim] for output in outputs]) for dim in outputs[0]}


def chunked_embeddings(
    embed: Callable[[Mapping], Mapping[int, torch.Tensor]],
    batch: Mapping,
    chunk_size: int | None,
    parameters: list[torch.Tensor] | None,
) -> dict[int, torch.Tensor]:
    """``embed(batch)``: whole when ``chunk_size`` is None or covers the batch, else in GradCache
    chunks (``parameters``: the trainable ones; None: a frozen side, chunked without a graph)."""
    rows = len(batch["ids"]) if chunk_size is not None else 0
    if chunk_size is None or chunk_size >= rows:
        return embed(batch)
    if parameters is None:
        return chunked_no_grad(embed, batch, rows, chunk_size)
    return grad_cached_embeddings(embed, batch, rows, chunk_size, parameters)
