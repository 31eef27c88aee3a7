"""Which index version serves, and the hot swap to a new one.

`IndexManager.current` is the serving `IndexVersion`. A swap loads the new version on a
worker thread (every file checked against its manifest's sha256 by
`load_index_version`), checks it against the model (dimension equal to the model's
output dim; with `require_model_match`, the manifest's model checksum equal to the
bundle's), and only then replaces `current` with one reference assignment. A batch
reads `current` once, so every answer comes from exactly one version, and in-flight
batches finish on the version they started with. `load_index_version` also checks what
the serving path relies on (ids unique non-null strings, labels that are row positions, a
probe search), so a version that would answer wrongly is refused before the swap, not
after. Any failure of a load, or of reading CURRENT, whatever its exception type, logs one
line, counts once in `retrieval_index_swaps_total{result="failed"}` and leaves the old
version serving; the same failure seen again on the next poll is neither logged nor
counted again.

Triggers:
    * `watch_current`: reads ``INDEX_ROOT/CURRENT`` every `poll_s` (always on; CURRENT is
      the source of truth). A version that failed is not retried until CURRENT changes.
    * `watch_redis`: subscribes to `retrieval.index_store.PUBLISH_CHANNEL`; a message
      makes the manager re-read CURRENT at once (reconnecting with backoff).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from retrieval.index_store import (
    PUBLISH_CHANNEL,
    IndexStoreError,
    IndexVersion,
    load_index_version,
    read_current,
)

logger = logging.getLogger(__name__)

_REDIS_RETRY_MIN_S = 0.5
_REDIS_RETRY_MAX_S = 5.0


class IndexMismatchError(IndexStoreError):
    """The index version does not fit the loaded model (dimension or model checksum)."""


class ServingIndex:
    """A loaded index version plus its ids as a numpy object array (fast row -> id).

    Args:
        loaded: the verified `IndexVersion`.
    """

    def __init__(self, loaded: IndexVersion) -> None:
        self.loaded = loaded
        self.ids: npt.NDArray[np.object_] = np.array(loaded.item_ids.to_pylist(), dtype=object)

    @property
    def version(self) -> str:
        return self.loaded.version

    @property
    def num_items(self) -> int:
        return self.loaded.num_items

    @property
    def dim(self) -> int:
        return self.loaded.dim

    @property
    def manifest(self) -> dict[str, Any]:
        return self.loaded.manifest

    def search(self, query_emb: npt.NDArray[np.float32], k: int) -> tuple[Any, Any]:
        """`IndexVersion.search`: (scores [Q, k], rows [Q, k]), -1 padded."""
        return self.loaded.search(query_emb, k)


class IndexManager:
    """Holds the serving index version and swaps it (see the module docstring).

    Args:
        root: the index root.
        model_dim: the model's output dimension D.
        model_checksum: the bundle's checksum (`ModelBundle.checksum`).
        require_model_match: refuse versions built from another bundle.
        on_swap: metrics hook, called with (ok, version, num_items) after each attempt.
        list_scanner: search IVF-SQ8 versions with `retrieval.ivf_scan.ListScanner`
            (`IndexVersion.use_list_scanner`; other indexes keep FAISS's search).
        mmap: load versions with ``load_index_version(..., mmap=True)``: IVF lists
            memory-mapped (`retrieval.index_format.read_index_file`), one copy in the page
            cache for every process serving the version; a swap maps the new version's
            files and the old mapping goes when the old version is dropped.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        model_dim: int,
        model_checksum: str,
        require_model_match: bool = True,
        on_swap: Callable[[bool, str, int], None] | None = None,
        list_scanner: bool = False,
        mmap: bool = False,
    ) -> None:
        self.root = Path(root)
        self.model_dim = model_dim
        self.model_checksum = model_checksum
        self.require_model_match = require_model_match
        self.current: ServingIndex | None = None
        self.last_attempted: str | None = None
        self.last_error: str | None = None
        self.swaps_ok = 0
        self.swaps_failed = 0
        self.checks = 0  # reads of CURRENT by `check_current` (polls and announcements)
        self._current_error: str | None = None  # the CURRENT read failure already counted
        self._watcher_error: str | None = None  # the watcher error already logged
        self._on_swap = on_swap
        self.list_scanner = list_scanner
        self.mmap = mmap
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ loading

    def load(self, version: str | None = None) -> ServingIndex:
        """Load and check one version (blocking: file hashing and FAISS read).

        Raises:
            FileNotFoundError: no CURRENT or no such version.
            IndexStoreError: bad manifest or files (`ChecksumMismatchError` on a checksum),
                or `IndexMismatchError` when it does not fit the model.
        """
        loaded = load_index_version(self.root, version, mmap=self.mmap)
        if loaded.dim != self.model_dim:
            raise IndexMismatchError(
                f"index version {loaded.version!r} has dim {loaded.dim}; the model's output "
                f"dim is {self.model_dim}"
            )
        model_section = loaded.manifest.get("model")
        built_with = model_section.get("checksum") if isinstance(model_section, dict) else None
        if self.require_model_match and built_with != self.model_checksum:
            raise IndexMismatchError(
                f"index version {loaded.version!r} was built from model bundle "
                f"{str(built_with)[:12]}..., not the loaded one {self.model_checksum[:12]}... "
                "(set require_model_match=false to serve it anyway)"
            )
        if self.list_scanner:
            loaded.use_list_scanner()
        return ServingIndex(loaded)

    def load_initial(self) -> ServingIndex:
        """Load CURRENT at start-up (errors propagate: the service must not start without it)."""
        started = time.perf_counter()
        loaded = self.load()
        self._install(loaded)
        logger.info(
            "serving index version %s (%d items) after %.2fs",
            loaded.version,
            loaded.num_items,
            time.perf_counter() - started,
        )
        return loaded

    def _install(self, loaded: ServingIndex) -> None:
        self.current = loaded  # the swap: one reference assignment
        self.last_attempted = loaded.version
        self.last_error = None
        self.swaps_ok += 1
        if self._on_swap is not None:
            self._on_swap(True, loaded.version, loaded.num_items)

    async def swap_to(self, version: str | None = None) -> bool:
        """Load `version` (default: what CURRENT names) off the event loop and swap to it.

        Returns True when it now serves, False when the load failed (old version kept)
        or there was nothing to do.
        """
        async with self._lock:
            try:
                target = version or await asyncio.to_thread(read_current, self.root)
            except Exception as exc:  # any failure to read CURRENT is counted, never raised
                self._fail_current(exc)
                return False
            self._current_error = None
            if self.current is not None and target == self.current.version:
                self.last_attempted = target
                return False
            self.last_attempted = target
            started = time.perf_counter()
            try:
                loaded = await asyncio.to_thread(self.load, target)
            except Exception as exc:  # whatever a bad version raises, the old one serves
                self._fail(target, exc)
                return False
            previous = self.current.version if self.current is not None else None
            self._install(loaded)
            logger.info(
                "index swapped %s -> %s (%d items) in %.2fs",
                previous,
                loaded.version,
                loaded.num_items,
                time.perf_counter() - started,
            )
            return True

    def _fail(self, target: str | None, exc: BaseException) -> None:
        """Count and log one failed attempt (one line; the traceback only at DEBUG, and
        only for exception types that no check raises on purpose)."""
        self.swaps_failed += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        serving = self.current.version if self.current is not None else None
        logger.error(
            "index swap to %s failed, still serving %s: %s", target, serving, self.last_error
        )
        if not isinstance(exc, FileNotFoundError | IndexStoreError):
            logger.debug("traceback of the failed swap to %s", target, exc_info=exc)
        if self._on_swap is not None:
            self._on_swap(False, target or "", 0)

    def _fail_current(self, exc: BaseException) -> None:
        """A failure to read CURRENT: counted and logged once while it stays the same."""
        error = f"{type(exc).__name__}: {exc}"
        if error == self._current_error:
            return
        self._current_error = error
        self._fail(None, exc)

    # ------------------------------------------------------------------ triggers

    async def check_current(self) -> bool:
        """Swap when CURRENT names a version other than the last one tried.

        A CURRENT that cannot be read (missing, not UTF-8, not a version name) counts as
        one failed swap until it changes; a version that failed is not tried again until
        CURRENT names another one.
        """
        self.checks += 1
        try:
            target = await asyncio.to_thread(read_current, self.root)
        except Exception as exc:  # any failure to read CURRENT is counted, never raised
            self._fail_current(exc)
            return False
        self._current_error = None
        if target == self.last_attempted:
            return False
        return await self.swap_to(target)

    async def watch_current(self, poll_s: float) -> None:
        """Poll CURRENT forever (cancel the task to stop)."""
        while True:
            await asyncio.sleep(poll_s)
            try:
                await self.check_current()
            except Exception as exc:  # the watcher must survive anything; log it once
                error = f"{type(exc).__name__}: {exc}"
                if error != self._watcher_error:
                    self._watcher_error = error
                    logger.exception("index watcher error")
            else:
                self._watcher_error = None

    async def watch_redis(self, client: Any, channel: str = PUBLISH_CHANNEL) -> None:
        """Follow the index job's announcements (cancel the task to stop).

        A message is a hint: the manager re-reads CURRENT, which decides what serves.
        """
        delay = _REDIS_RETRY_MIN_S
        while True:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                logger.info("subscribed to redis channel %s", channel)
                delay = _REDIS_RETRY_MIN_S
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None or message.get("type") != "message":
                        continue
                    data = message.get("data")
                    announced = (
                        data.decode(errors="replace") if isinstance(data, bytes) else str(data)
                    )
                    logger.info("index announcement on %s: %s", channel, announced[:128])
                    await self.check_current()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning(
                    "index channel subscription lost (%s: %s); retrying in %.1fs",
                    type(exc).__name__,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _REDIS_RETRY_MAX_S)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
