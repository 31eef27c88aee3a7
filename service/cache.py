"""The optional response cache in Redis.

A key is ``{prefix}cache:{model_version}:{index_version}:{sha256(canonical request)}``:
a new model or index version never serves an older answer, and the canonical request
(checked features in a fixed order, k, sorted exclusions, user id and `exclude_seen`)
makes equal requests share an entry. Values are JSON ``{"ids": [...], "scores": [...]}``
with a TTL. A `user_id` query is keyed by the id, so features pushed later are seen
after at most the TTL.

Redis trouble never fails a request: a failed lookup is a miss (counted as an error),
a failed write is dropped (counted as an error too), and while `RedisLink` is backing off
the cache is skipped. A write that Redis refuses (``OOM`` at `maxmemory`, ``READONLY``
on a replica) does not put the link into backoff, so `user_id` lookups keep reading.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

from service.redis_link import RedisLink, RedisUnavailableError

logger = logging.getLogger(__name__)

CACHE_KEY = "cache:"
_MAX_PENDING_WRITES = 1024


def canonical_digest(request: dict[str, Any]) -> str:
    """sha256 of the request as canonical JSON (sorted keys, no spaces).

    >>> canonical_digest({"k": 5, "q": {"a": "x"}}) == canonical_digest({"q": {"a": "x"}, "k": 5})
    True
    """
    text = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class ResponseCache:
    """Get/put retrieval answers keyed by model version, index version and request.

    Args:
        link: the shared Redis link.
        prefix: key prefix.
        ttl_s: entry lifetime in seconds.
        observe: metrics hook called with "hit", "miss" or "error".
    """

    def __init__(
        self,
        link: RedisLink,
        prefix: str,
        ttl_s: int,
        observe: Callable[[str], None] | None = None,
    ) -> None:
        self.link = link
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._observe = observe or (lambda result: None)
        self._writes: set[asyncio.Task[None]] = set()

    def key(self, model_version: str, index_version: str, request: dict[str, Any]) -> str:
        return (
            f"{self.prefix}{CACHE_KEY}{model_version}:{index_version}:{canonical_digest(request)}"
        )

    async def get(self, key: str) -> dict[str, Any] | None:
        if not self.link.up:
            self._observe("error")
            return None
        try:
            raw = await self.link.call(lambda client: client.get(key))
        except RedisUnavailableError:
            self._observe("error")
            return None
        if raw is None:
            self._observe("miss")
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            self._observe("error")
            return None
        self._observe("hit")
        return value if isinstance(value, dict) else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        """Store `value` in the background (never delays the answer)."""
        if not self.link.up or len(self._writes) >= _MAX_PENDING_WRITES:
            return
        payload = json.dumps(value, separators=(",", ":"))

        async def write() -> None:
            try:
                await self.link.call(lambda client: client.set(key, payload, ex=self.ttl_s))
            except RedisUnavailableError:  # refused (OOM, READONLY) or unreachable: dropped
                self._observe("error")

        task = asyncio.get_running_loop().create_task(write())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def flush(self) -> None:
        """Wait for pending writes (shutdown, tests)."""
        if self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)
