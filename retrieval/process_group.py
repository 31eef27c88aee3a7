"""The process group of a multi-process job (torchrun): joining it from the environment,
leaving it, and this process's rank. The training and index jobs both run under torchrun
and use these helpers, so each is written once.

Usage (one process per rank; torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT)::

    joined = setup_from_env()          # gloo on CPU, nccl with CUDA; False: single process
    try:
        if rank() == 0:
            ...                        # the rank that writes the artifact
    finally:
        teardown()

Without a process group the helpers describe a single process:

    >>> is_distributed(), rank(), world_size()
    (False, 0, 1)
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = [
    "BACKENDS",
    "is_distributed",
    "local_rank",
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


def local_rank() -> int:
    """This process's rank on its machine (torchrun's ``LOCAL_RANK``; 0 when unset): the
    index of the CUDA device it uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def setup_from_env(backend: str | None = None, timeout: timedelta | None = None) -> bool:
    """Join the process group described by torchrun's environment variables.

    Reads ``WORLD_SIZE`` (absent or 1: single process, nothing to do), ``RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT`` and, for nccl, ``LOCAL_RANK`` (the CUDA device).

    Args:
        backend: "gloo" or "nccl"; default nccl when CUDA is available, else gloo.
        timeout: how long a collective waits for the other ranks (default: torch's).

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
        torch.cuda.set_device(local_rank())
    if timeout is None:
        dist.init_process_group(backend=backend, init_method="env://")
    else:
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    logger.info("joined process group: backend=%s rank=%d/%d", backend, rank(), world_size())
    return True


def teardown() -> None:
    """Leave the process group, if any (safe to call when not distributed)."""
    if is_distributed():
        dist.destroy_process_group()
