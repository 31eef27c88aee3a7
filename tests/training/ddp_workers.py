"""Spawned-process workers of test_distributed.py: module level in an importable module,
so `spawn` children can import them (test modules are not importable by name)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from retrieval.loss import RetrievalTask
from training import distributed
from training.distributed import (
    all_gather_sizes,
    gather_with_grad,
    is_distributed,
    rank,
    setup_from_env,
    teardown,
    world_size,
)

WORLD_SIZE = 2
LOCAL_BATCH = 3
DIM = 4
# Item ids with repeats across ranks (accidental hits span the global pool).
GLOBAL_ITEM_IDS = torch.tensor([0, 3, 3, 1, 0, 2])
ITEM_COUNTS = torch.tensor([3.0, 1.0, 1.0, 2.0])


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(WORLD_SIZE * LOCAL_BATCH, DIM, generator=gen)
    items = torch.randn(WORLD_SIZE * LOCAL_BATCH, DIM, generator=gen)
    return query, items


def make_task() -> RetrievalTask:
    return RetrievalTask(temperature=0.2, item_frequencies=ITEM_COUNTS, mask_accidental_hits=True)


def gather_worker(local_rank: int, port: int, out_dir: str) -> None:
    """One rank: join through the env vars torchrun would set, run the checks, save results."""
    os.environ.update(
        RANK=str(local_rank),
        WORLD_SIZE=str(WORLD_SIZE),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    assert setup_from_env() is True
    assert distributed.is_distributed() and rank() == local_rank and world_size() == WORLD_SIZE
    rows = slice(local_rank * LOCAL_BATCH, (local_rank + 1) * LOCAL_BATCH)

    # 1. Loss on the global candidate pool: local queries, gathered items and ids.
    query_all, items_all = global_batch()
    query = query_all[rows].clone().requires_grad_(True)
    items = items_all[rows].clone().requires_grad_(True)
    pool = gather_with_grad(items)  # (W * B, D)
    pool_ids = gather_with_grad(GLOBAL_ITEM_IDS[rows].clone())
    loss = make_task().loss(query, pool, pool_ids, positive_offset=local_rank * LOCAL_BATCH)
    loss.backward()

    # 2. Gradient routing: rank r weights the gathered rows by (r + 1) * base.
    base = torch.arange(WORLD_SIZE * 2 * 3, dtype=torch.float32).view(WORLD_SIZE * 2, 3)
    grads = {}
    for sync in (False, True):
        x = torch.full((2, 3), float(local_rank), requires_grad=True)
        gathered = gather_with_grad(x, sync_grads=sync)
        (gathered * base * (local_rank + 1)).sum().backward()
        assert x.grad is not None
        grads[sync] = (gathered.detach(), x.grad)

    # 3. Uneven row counts (a short last batch): rank 0 has 3 rows, rank 1 has 2.
    uneven = gather_with_grad(torch.full((3 - local_rank, 2), float(local_rank)))

    torch.save(
        {
            "pool_shape": tuple(pool.shape),
            "pool": pool.detach(),
            "pool_ids": pool_ids,
            "loss": loss.detach(),
            "query_grad": query.grad,
            "items_grad": items.grad,
            "grads": grads,
            "sizes": all_gather_sizes(3 - local_rank),
            "uneven": uneven,
        },
        Path(out_dir) / f"rank{local_rank}.pt",
    )
    teardown()
    assert not is_distributed()
