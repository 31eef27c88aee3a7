"""gather_with_grad and process-group helpers: single-process identity, and a real 2-process
gloo group on CPU checked against the single-process loss and gradients."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

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


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(WORLD_SIZE * LOCAL_BATCH, DIM, generator=gen)
    items = torch.randn(WORLD_SIZE * LOCAL_BATCH, DIM, generator=gen)
    return query, items


def _task() -> RetrievalTask:
    return RetrievalTask(temperature=0.2, item_frequencies=ITEM_COUNTS, mask_accidental_hits=True)


def test_single_process_helpers_are_identities(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert (is_distributed(), rank(), world_size()) == (False, 0, 1)
    assert setup_from_env() is False
    assert all_gather_sizes(5) == [5]
    x = torch.ones(2, 3, requires_grad=True)
    assert gather_with_grad(x) is x
    teardown()  # no group: nothing to do, no error
    with pytest.raises(ValueError, match="`backend`"):
        setup_from_env(backend="mpi-typo")


def _worker(local_rank: int, port: int, out_dir: str) -> None:
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
    query_all, items_all = _global_batch()
    query = query_all[rows].clone().requires_grad_(True)
    items = items_all[rows].clone().requires_grad_(True)
    pool = gather_with_grad(items)  # (W * B, D)
    pool_ids = gather_with_grad(GLOBAL_ITEM_IDS[rows].clone())
    loss = _task().loss(query, pool, pool_ids, positive_offset=local_rank * LOCAL_BATCH)
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.timeout(120)
def test_gather_with_grad_in_a_two_process_gloo_group(tmp_path: Path) -> None:
    mp.start_processes(
        _worker,
        args=(_free_port(), str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=True,
        start_method="spawn",
    )
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    query_all, items_all = _global_batch()

    # The gathered pool has world_size * B rows, in rank order.
    for result in results:
        assert result["pool_shape"] == (WORLD_SIZE * LOCAL_BATCH, DIM)
        torch.testing.assert_close(result["pool"], items_all)
        assert torch.equal(result["pool_ids"], GLOBAL_ITEM_IDS)

    # Single-process reference on the concatenated batch.
    query_ref = query_all.clone().requires_grad_(True)
    items_ref = items_all.clone().requires_grad_(True)
    loss_ref = _task().loss(query_ref, items_ref, GLOBAL_ITEM_IDS)
    loss_ref.backward()
    assert query_ref.grad is not None and items_ref.grad is not None
    # DDP averages the rank losses (and gradients): the mean equals the global mean loss.
    mean_loss = torch.stack([r["loss"] for r in results]).mean()
    torch.testing.assert_close(mean_loss, loss_ref.detach())
    # Each rank's local gradient is world_size x the global one (DDP then divides by W):
    # with sync_grads, items also get the other ranks' queries' gradient.
    for r, result in enumerate(results):
        rows = slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
        torch.testing.assert_close(result["query_grad"], WORLD_SIZE * query_ref.grad[rows])
        torch.testing.assert_close(result["items_grad"], WORLD_SIZE * items_ref.grad[rows])

    # Gradient flows only to the local rows: rank r's x gets its own slice of its upstream
    # (r + 1) * base without sync, and the sum over ranks, (1 + 2) * base, with sync.
    base = torch.arange(WORLD_SIZE * 2 * 3, dtype=torch.float32).view(WORLD_SIZE * 2, 3)
    for r, result in enumerate(results):
        rows = slice(r * 2, (r + 1) * 2)
        for sync, factor in ((False, r + 1), (True, 1 + 2)):
            gathered, grad = result["grads"][sync]
            assert gathered.shape == (WORLD_SIZE * 2, 3)
            assert gathered[:2].eq(0).all() and gathered[2:].eq(1).all()
            torch.testing.assert_close(grad, factor * base[rows])

    for result in results:
        assert result["sizes"] == [3, 2]
        torch.testing.assert_close(
            result["uneven"], torch.tensor([[0.0, 0.0]] * 3 + [[1.0, 1.0]] * 2)
        )
