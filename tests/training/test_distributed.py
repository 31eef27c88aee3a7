"""gather_with_grad and process-group helpers: single-process identity, and a real 2-process
gloo group on CPU checked against the single-process loss and gradients."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from ddp_workers import (
    DIM,
    GLOBAL_ITEM_IDS,
    LOCAL_BATCH,
    WORLD_SIZE,
    gather_worker,
    global_batch,
    make_task,
)

from training.distributed import (
    all_gather_sizes,
    gather_with_grad,
    is_distributed,
    rank,
    setup_from_env,
    teardown,
    world_size,
)


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.timeout(120)
def test_gather_with_grad_in_a_two_process_gloo_group(tmp_path: Path) -> None:
    mp.start_processes(
        gather_worker,
        args=(_free_port(), str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=True,
        start_method="spawn",
    )
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    query_all, items_all = global_batch()

    # The gathered pool has world_size * B rows, in rank order.
    for result in results:
        assert result["pool_shape"] == (WORLD_SIZE * LOCAL_BATCH, DIM)
        torch.testing.assert_close(result["pool"], items_all)
        assert torch.equal(result["pool_ids"], GLOBAL_ITEM_IDS)

    # Single-process reference on the concatenated batch.
    query_ref = query_all.clone().requires_grad_(True)
    items_ref = items_all.clone().requires_grad_(True)
    loss_ref = make_task().loss(query_ref, items_ref, GLOBAL_ITEM_IDS)
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
