"""Data-parallel helpers: an all-gather that keeps the local rows differentiable, for a
candidate pool shared across ranks, plus the process-group helpers of
`retrieval.process_group` (re-exported here, so the trainer imports one module).

Usage (one process per rank; torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)::

    torchrun --nproc-per-node 2 <training entry point> ...

    setup_from_env()                                  # gloo on CPU, nccl with CUDA
    items = gather_with_grad(item_emb)                # (world_size * B, D)
    loss = task.loss(query_emb, items, gather_with_grad(item_ids),
                     positive_offset=rank() * len(query_emb))
    ...
    teardown()

Without a process group every helper is the single-process identity:

    >>> import torch
    >>> is_distributed(), rank(), world_size()
    (False, 0, 1)
    >>> x = torch.ones(2, 3, requires_grad=True)
    >>> gather_with_grad(x) is x
    True
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import Tensor

from retrieval.process_group import (
    BACKENDS,
    is_distributed,
    local_rank,
    rank,
    setup_from_env,
    teardown,
    world_size,
)

__all__ = [
    "BACKENDS",
    "all_gather_sizes",
    "gather_with_grad",
    "is_distributed",
    "local_rank",
    "rank",
    "setup_from_env",
    "teardown",
    "world_size",
]

logger = logging.getLogger(__name__)


def all_gather_sizes(num_rows: int) -> list[int]:
    """Every rank's `num_rows`, in rank order (``[num_rows]`` when not distributed).

    ``sum(sizes[:rank()])`` is this rank's first row in a `gather_with_grad` result.
    """
    if not is_distributed():
        return [num_rows]
    device = _collective_device()
    local = torch.tensor([num_rows], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(local) for _ in range(world_size())]
    dist.all_gather(sizes, local)
    return [int(s) for s in sizes]


def gather_with_grad(tensor: Tensor, sync_grads: bool = True) -> Tensor:
    """Concatenate every rank's `tensor` along dim 0, in rank order, keeping the local rows
    differentiable. Rows received from other ranks are constants in this rank's graph.

    Backward returns the gradient of this rank's own slice. With ``sync_grads=True``
    (default) that gradient is first summed over ranks, so the local rows also receive the
    gradient of the other ranks' losses, which used them as candidates: each rank scores its
    own queries against the global pool, DDP averages, and the parameter gradient equals the
    single-process gradient of the mean loss over the global batch. Use ``sync_grads=False``
    when every rank computes the same global loss itself (then summing would count it
    world_size times).

    Ranks may hold different numbers of rows (e.g. a short last batch); trailing dims, dtype
    and device must match. Not distributed: returns `tensor` itself.

    Args:
        tensor: ``[B_local, ...]`` this rank's rows.
        sync_grads: sum the incoming gradient over ranks in backward.

    Returns:
        ``[sum of B_local over ranks, ...]``.
    """
    if not is_distributed():
        return tensor
    if tensor.dim() == 0:
        raise ValueError("`tensor` must have a leading row dimension; got a 0-d tensor")
    sizes = all_gather_sizes(tensor.shape[0])
    gathered: Tensor = _GatherWithGrad.apply(tensor, sizes, sync_grads)
    return gathered


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor, sizes: list[int], sync_grads: bool) -> Tensor:
        ctx.sizes = sizes
        ctx.sync_grads = sync_grads
        ctx.rank = dist.get_rank()
        longest = max(sizes)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor  # all_gather needs one shape on every rank
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        parts[ctx.rank] = tensor  # the local rows are this rank's own tensor
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)], dim=0)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:
        grad = grad_output.contiguous()
        if ctx.sync_grads:
            grad = grad.clone()  # all_reduce is in place; autograd may reuse grad_output
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def _collective_device() -> torch.device:
    """nccl moves CUDA tensors only; gloo uses the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
