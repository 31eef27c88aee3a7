"""The micro-batching queue: concurrent requests share one model pass and one index search.

`MicroBatcher.submit(item)` puts an item on the queue and returns an `asyncio.Future`.
A worker task takes the first waiting item, then keeps taking items until the batch
holds `max_batch_size` of them or `max_wait_s` has passed since the first one (with
``max_wait_s=0`` it takes only what is already queued), and runs ``process(items)`` on
a dedicated worker thread, off the event loop. While a batch runs, new items queue up
and form the next batch, so under load batches grow by themselves. With ``workers=N``
up to N batches run at once, each on its own thread (``process`` must then be safe to
call concurrently; FAISS and torch release the GIL while they compute, so two workers
search on two cores).

``process`` returns one result per item, in order; a result that is an ``Exception``
instance is set as that item's exception only, and an exception raised by ``process``
itself goes to every future of the batch. Items whose future was cancelled while
waiting (the client went away, or its deadline passed) are skipped before the batch runs.

Example:
    >>> import asyncio
    >>> async def main():
    ...     batcher = MicroBatcher(lambda xs: [x * 10 for x in xs], max_batch_size=4)
    ...     batcher.start()
    ...     results = await asyncio.gather(*(batcher.submit(i) for i in range(6)))
    ...     await batcher.stop()
    ...     return results, list(batcher.batch_sizes)
    >>> asyncio.run(main())
    ([0, 10, 20, 30, 40, 50], [4, 2])
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

_KEEP_BATCH_SIZES = 1000  # recent batch sizes kept for tests and /v1/info


class BatcherClosedError(RuntimeError):
    """`submit` was called on a batcher that is not running."""


@dataclass
class _Pending(Generic[T]):
    item: T
    future: asyncio.Future[Any]
    enqueued: float


class MicroBatcher(Generic[T, R]):
    """Groups submitted items into batches for ``process`` (see the module docstring).

    Args:
        process: ``items -> results`` (same length and order); a result may be an
            ``Exception`` for that item alone. Runs on the worker thread.
        max_batch_size: most items per batch (>= 1).
        max_wait_s: longest wait for more items after a batch's first one (>= 0).
        on_batch: called on the event loop after each batch with its size and the
            seconds the batch took (metrics hook).
        expected: optional hint, the number of items the caller expects to be queued or
            about to be (e.g. requests admitted and still being parsed). The worker waits
            for more only while this exceeds the batch it holds, so a lone request never
            waits `max_wait_s` for company that cannot come.
        thread_name: name prefix of the worker threads.
        workers: batches that may run at once (>= 1), one thread each.
    """

    def __init__(
        self,
        process: Callable[[Sequence[T]], Sequence[R | BaseException]],
        *,
        max_batch_size: int = 64,
        max_wait_s: float = 0.001,
        on_batch: Callable[[int, float], None] | None = None,
        expected: Callable[[], int] | None = None,
        thread_name: str = "batch-worker",
        workers: int = 1,
    ) -> None:
        if (
            isinstance(max_batch_size, bool)
            or not isinstance(max_batch_size, int)
            or max_batch_size < 1
        ):
            raise ValueError(f"`max_batch_size` must be an int >= 1; got {max_batch_size!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"`workers` must be an int >= 1; got {workers!r}")
        if not max_wait_s >= 0:
            raise ValueError(f"`max_wait_s` must be >= 0; got {max_wait_s!r}")
        self._process = process
        self.max_batch_size = max_batch_size
        self.max_wait_s = float(max_wait_s)
        self._on_batch = on_batch
        self._expected = expected
        self._thread_name = thread_name
        self.workers = workers
        self._queue: collections.deque[_Pending[T]] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=_KEEP_BATCH_SIZES)
        self.skipped_cancelled = 0
        self.in_batch = 0  # items in the batches now running

    # ------------------------------------------------------------------ state

    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch (not counting the batches now running)."""
        return len(self._queue)

    @property
    def running(self) -> bool:
        return bool(self._tasks) and not any(task.done() for task in self._tasks)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the worker tasks on the running event loop."""
        if self.running:
            return
        self._closing = False
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(
            max_workers=self.workers, thread_name_prefix=self._thread_name
        )
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._run(), name=f"{self._thread_name}-{i}")
            for i in range(self.workers)
        ]

    async def stop(self, *, drain: bool = True) -> None:
        """Stop taking new items; with `drain`, finish every queued item first.

        Items still queued when not draining get `BatcherClosedError`.
        """
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if not drain:
            self._fail_queued(BatcherClosedError("the batcher stopped before this item ran"))
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self._fail_queued(BatcherClosedError("the batcher stopped before this item ran"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _fail_queued(self, error: BaseException) -> None:
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(error)

    # ------------------------------------------------------------------ submit

    def submit(self, item: T) -> asyncio.Future[R]:
        """Queue `item`; the returned future resolves to its result (or its exception).

        Raises:
            BatcherClosedError: the batcher is not running or is stopping.
        """
        if self._closing or not self.running or self._wakeup is None:
            raise BatcherClosedError("the batcher is not running")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(item, future, time.perf_counter()))
        self._wakeup.set()
        return future

    # ------------------------------------------------------------------ worker

    def _take_ready(self, batch: list[_Pending[T]]) -> None:
        """Move queued items into `batch` (up to the cap), dropping cancelled ones."""
        while self._queue and len(batch) < self.max_batch_size:
            pending = self._queue.popleft()
            if pending.future.done():  # cancelled by its request (deadline, disconnect)
                self.skipped_cancelled += 1
                continue
            batch.append(pending)

    async def _collect(self) -> list[_Pending[T]]:
        """The next batch: wait for a first item, then fill until full or the wait ends."""
        assert self._wakeup is not None
        batch: list[_Pending[T]] = []
        while not batch:
            if not self._queue:
                if self._closing:
                    return batch
                self._wakeup.clear()
                await self._wakeup.wait()
            self._take_ready(batch)
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch_size and not self._closing:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            if self._expected is not None and self._expected() - self.in_batch <= len(batch):
                break  # nobody else is on the way (running batches' items are not)
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            self._take_ready(batch)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                return  # closing and nothing left
            # A future may have been cancelled during the wait: drop it now.
            live = [p for p in batch if not p.future.done()]
            self.skipped_cancelled += len(batch) - len(live)
            if not live:
                continue
            self.in_batch += len(live)
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(
                    self._executor, self._process, [p.item for p in live]
                )
                if len(results) != len(live):
                    raise RuntimeError(
                        f"batch process returned {len(results)} results for {len(live)} items"
                    )
            except asyncio.CancelledError:
                for pending in live:
                    pending.future.cancel()
                raise
            except Exception as exc:
                logger.debug("batch of %d failed: %s", len(live), exc)
                for pending in live:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
            else:
                for pending, result in zip(live, results, strict=True):
                    if pending.future.done():
                        continue
                    if isinstance(result, BaseException):
                        pending.future.set_exception(result)
                    else:
                        pending.future.set_result(result)
            finally:
                self.in_batch -= len(live)
            seconds = time.perf_counter() - started
            self.batch_sizes.append(len(live))
            if self._on_batch is not None:
                try:
                    self._on_batch(len(live), seconds)
                except Exception:  # a metrics hook must not stop the worker
                    logger.exception("on_batch hook failed")
