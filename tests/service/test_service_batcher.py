"""The micro-batching queue: batching by size and by wait, cancelled items skipped,
exceptions delivered to the right futures, draining on stop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import pytest

from service.batcher import BatcherClosedError, MicroBatcher

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


def test_batches_are_capped_by_size() -> None:
    seen: list[list[int]] = []

    def process(items: Sequence[int]) -> list[int]:
        seen.append(list(items))
        return [x + 100 for x in items]

    async def main() -> list[int]:
        batcher = MicroBatcher(process, max_batch_size=3, max_wait_s=0.5)
        batcher.start()
        futures = [batcher.submit(i) for i in range(7)]  # all queued before the worker runs
        results = await asyncio.gather(*futures)
        await batcher.stop()
        return results

    assert run(main()) == [100 + i for i in range(7)]
    # 7 items, cap 3: batches of 3, 3, 1 in submission order
    assert seen == [[0, 1, 2], [3, 4, 5], [6]]


def test_batch_waits_for_more_items_up_to_max_wait() -> None:
    seen: list[list[str]] = []

    def process(items: Sequence[str]) -> list[str]:
        seen.append(list(items))
        return list(items)

    async def main() -> float:
        batcher = MicroBatcher(process, max_batch_size=10, max_wait_s=0.2)
        batcher.start()
        started = time.perf_counter()
        first = batcher.submit("a")
        await asyncio.sleep(0.05)  # within the 0.2 s wait: joins the same batch
        second = batcher.submit("b")
        await asyncio.gather(first, second)
        elapsed = time.perf_counter() - started
        await batcher.stop()
        return elapsed

    elapsed = run(main())
    assert seen == [["a", "b"]]
    assert elapsed >= 0.19  # the batch closed when the wait ran out, not when "b" came


def test_zero_wait_takes_only_what_is_queued() -> None:
    seen: list[list[int]] = []

    def process(items: Sequence[int]) -> list[int]:
        seen.append(list(items))
        return list(items)

    async def main() -> None:
        batcher = MicroBatcher(process, max_batch_size=10, max_wait_s=0.0)
        batcher.start()
        await batcher.submit(1)
        await batcher.submit(2)
        await batcher.stop()

    run(main())
    assert seen == [[1], [2]]


def test_cancelled_items_are_skipped() -> None:
    seen: list[list[int]] = []
    gate = threading.Event()

    def process(items: Sequence[int]) -> list[int]:
        seen.append(list(items))
        gate.wait(5)  # the first batch holds the worker while the others queue
        return list(items)

    async def main() -> tuple[int, int]:
        batcher = MicroBatcher(process, max_batch_size=10, max_wait_s=0.0)
        batcher.start()
        first = batcher.submit(0)
        await asyncio.sleep(0.05)  # batch [0] is running
        queued = [batcher.submit(i) for i in (1, 2, 3)]
        depth = batcher.queue_depth
        queued[1].cancel()  # item 2 is abandoned by its request
        gate.set()
        await first
        results = await asyncio.gather(queued[0], queued[2])
        await batcher.stop()
        return depth, sum(results)

    depth, total = run(main())
    assert depth == 3
    assert seen == [[0], [1, 3]]  # 2 never reached process
    assert total == 4


def test_exceptions_reach_the_right_futures() -> None:
    def process(items: Sequence[int]) -> list[int | BaseException]:
        return [ValueError(f"bad {x}") if x % 2 else x for x in items]

    async def main() -> list[object]:
        batcher: MicroBatcher[int, int] = MicroBatcher(process, max_batch_size=8, max_wait_s=0.01)
        batcher.start()
        futures = [batcher.submit(i) for i in range(4)]
        results: list[object] = list(await asyncio.gather(*futures, return_exceptions=True))
        await batcher.stop()
        return results

    results = run(main())
    assert results[0] == 0 and results[2] == 2
    assert isinstance(results[1], ValueError) and str(results[1]) == "bad 1"
    assert isinstance(results[3], ValueError) and str(results[3]) == "bad 3"


def test_a_failing_batch_fails_only_its_own_items() -> None:
    def process(items: Sequence[int]) -> list[int]:
        if 99 in items:
            raise RuntimeError("model crashed")
        return list(items)

    async def main() -> tuple[object, object]:
        batcher = MicroBatcher(process, max_batch_size=1, max_wait_s=0.0)
        batcher.start()
        bad, good = batcher.submit(99), batcher.submit(1)
        results = await asyncio.gather(bad, good, return_exceptions=True)
        await batcher.stop()
        return results[0], results[1]

    bad, good = run(main())
    assert isinstance(bad, RuntimeError) and good == 1


def test_metrics_hook_and_queue_depth() -> None:
    sizes: list[int] = []

    async def main() -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(
            lambda xs: list(xs), max_batch_size=4, on_batch=lambda n, s: sizes.append(n)
        )
        batcher.start()
        futures = [batcher.submit(i) for i in range(6)]
        assert batcher.queue_depth == 6
        await asyncio.gather(*futures)
        assert batcher.queue_depth == 0
        await batcher.stop()

    run(main())
    assert sizes == [4, 2]


def test_stop_drains_and_then_refuses() -> None:
    async def main() -> list[int]:
        batcher: MicroBatcher[int, int] = MicroBatcher(
            lambda xs: [x * 2 for x in xs], max_batch_size=2, max_wait_s=0.0
        )
        batcher.start()
        futures = [batcher.submit(i) for i in range(5)]
        await batcher.stop(drain=True)
        with pytest.raises(BatcherClosedError):
            batcher.submit(9)
        return [f.result() for f in futures]

    assert run(main()) == [0, 2, 4, 6, 8]


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        MicroBatcher(lambda xs: xs, max_batch_size=0)
    with pytest.raises(ValueError, match="max_wait_s"):
        MicroBatcher(lambda xs: xs, max_wait_s=-1)


def test_no_wait_when_nobody_else_is_expected() -> None:
    seen: list[list[int]] = []

    def process(items: Sequence[int]) -> list[int]:
        seen.append(list(items))
        return list(items)

    async def main() -> tuple[float, float]:
        expected = 1
        batcher: MicroBatcher[int, int] = MicroBatcher(
            process, max_batch_size=8, max_wait_s=0.5, expected=lambda: expected
        )
        batcher.start()
        started = time.perf_counter()
        await batcher.submit(1)  # alone, and the hint says so: no 0.5 s wait
        alone = time.perf_counter() - started
        expected = 2  # a second request is admitted and on its way
        started = time.perf_counter()
        first = batcher.submit(2)
        await asyncio.sleep(0.05)
        await asyncio.gather(first, batcher.submit(3))
        together = time.perf_counter() - started
        await batcher.stop()
        return alone, together

    alone, together = run(main())
    assert alone < 0.25
    assert seen == [[1], [2, 3]]  # the worker waited for the expected second item
    assert together < 0.45  # and stopped waiting as soon as it came


def test_two_workers_run_two_batches_at_once() -> None:
    barrier = threading.Barrier(2, timeout=5)  # one worker alone would time out here
    threads: set[str] = set()

    def process(items: Sequence[int]) -> list[int]:
        threads.add(threading.current_thread().name)
        barrier.wait()
        return [x * 2 for x in items]

    async def main() -> tuple[list[int], int]:
        batcher = MicroBatcher(process, max_batch_size=1, max_wait_s=0.0, workers=2)
        batcher.start()
        results = await asyncio.gather(batcher.submit(1), batcher.submit(2))
        await batcher.stop()
        return list(results), batcher.in_batch

    results, in_batch = run(main())
    assert results == [2, 4]
    assert len(threads) == 2
    assert in_batch == 0


def test_items_of_a_running_batch_do_not_hold_the_next_one_back() -> None:
    """`expected` counts every admitted item; those already running are not on the way."""
    release = threading.Event()
    sizes: list[int] = []

    def process(items: Sequence[int]) -> list[int]:
        sizes.append(len(items))
        if items[0] == 0:
            release.wait(5)
        return list(items)

    async def main() -> float:
        admitted = 0
        batcher = MicroBatcher(
            process, max_batch_size=8, max_wait_s=2.0, workers=2, expected=lambda: admitted
        )
        batcher.start()
        admitted = 2
        first = batcher.submit(0)  # runs alone and blocks on `release`
        while batcher.in_batch == 0:
            await asyncio.sleep(0.001)
        began = time.perf_counter()
        second = await batcher.submit(1)  # nobody else is coming: no 2 s wait
        waited = time.perf_counter() - began
        release.set()
        await first
        await batcher.stop()
        assert second == 1
        return waited

    assert run(main()) < 1.0
    assert sizes == [1, 1]


def test_workers_must_be_a_positive_int() -> None:
    with pytest.raises(ValueError, match="`workers` must be an int >= 1"):
        MicroBatcher(lambda xs: list(xs), workers=0)
