"""Collectives shared by the loss (a gradient-keeping all-gather) and the training guards (agreement).

Plain ``torch.distributed.all_gather`` returns tensors without autograd history, so the
documents of other ranks would be negatives that send no gradient back, and the local shard's
gradient from the other ranks' queries would be lost. ``gather_with_grad`` keeps it: its
backward sums every rank's gradient for each row (all-reduce) and hands each rank its own
rows' share, which is what one process holding the whole global batch would compute.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Processes in the default group (1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if world_size() > 1 else 0


class _GatherRows(torch.autograd.Function):
    """Concatenates every rank's ``[n_r, ...]`` rows (n_r may differ) in rank order."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        ctx.sizes = sizes
        largest = max(sizes)
        padded = local.new_zeros((largest, *local.shape[1:]))
        padded[: local.shape[0]] = local
        slots = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(slots, padded.contiguous())
        return torch.cat([slot[:n] for slot, n in zip(slots, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        # Each rank's loss differentiates every gathered row; a row's total gradient is the sum
        # over ranks, and its own rank applies it. DDP then averages parameter gradients.
        grad = grad_output.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: rank()])
        return grad[start : start + ctx.sizes[rank()]], None


def gathered_sizes(local_rows: int, device: torch.device) -> tuple[int, ...]:
    """Every rank's row count, in rank order."""
    size = torch.tensor([local_rows], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    return tuple(int(s) for s in sizes)


def gathered_counts(local: tuple[int, ...], device: torch.device) -> list[tuple[int, ...]]:
    """Every rank's tuple of counts (e.g. rows and hard negatives), in rank order, in one collective."""
    values = torch.tensor(local, device=device, dtype=torch.long)
    everything = [torch.zeros_like(values) for _ in range(world_size())]
    dist.all_gather(everything, values)
    return [tuple(int(v) for v in value) for value in everything]


def gather_with_grad(local: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """All ranks' rows concatenated in rank order; gradients flow back to each rank's own rows."""
    if world_size() == 1:
        return local
    return _GatherRows.apply(local, sizes)


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True only if ``flag`` is true on every rank (a collective: every rank must call it)."""
    if world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0)


def gather_objects(local: object) -> list:
    """Every rank's picklable ``local``, in rank order (a collective under DDP)."""
    if world_size() == 1:
        return [local]
    everything = [None] * world_size()
    dist.all_gather_object(everything, local)
    return everything
