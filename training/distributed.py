"""Data-parallel helpers: process-group setup from the environment and an all-gather that
keeps the local rows differentiable, for a candidate pool shared across ranks.

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
import os

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_gather_sizes",
    "gather_with_grad",
    "is_distributed",
    "rank",
    "setup_from_env",
    "teardown",
    "world_size",
]

logger = logging.getLogger(__name__)

BACKENDS = ("gloo", "nccl")


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank; 0 when not distributed."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes; 1 when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


def setup_from_env(backend: str | None = None) -> bool:
    """Join the process group described by torchrun's environment variables.

    Reads ``WORLD_SIZE`` (absent or 1: single process, nothing to do), ``RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT`` and, for nccl, ``LOCAL_RANK`` (the CUDA device).

    Args:
        backend: "gloo" or "nccl"; default nccl when CUDA is available, else gloo.

    Returns:
        True when a process group is (now) initialised, False for a single process.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}; got {backend!r}")
    if is_distributed():
        return True
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size < 1:
        raise ValueError(f"`WORLD_SIZE` must be >= 1; got {size}")
    if size == 1:
        return False
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("`backend` 'nccl' needs CUDA, which is not available")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, init_method="env://")
    logger.info("joined process group: backend=%s rank=%d/%d", backend, rank(), world_size())
    return True


def teardown() -> None:
    """Leave the process group, if any (safe to call when not distributed)."""
    if is_distributed():
        dist.destroy_process_group()


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
