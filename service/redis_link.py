"""The service's Redis connection: one pool, short timeouts, bounded retries, a breaker.

Every Redis call goes through `RedisLink.call`. A call that could not reach Redis
(connection refused or lost, timeout) marks Redis *down* for `down_backoff_s`; while it
is down, calls fail at once with `RedisUnavailableError` instead of waiting on timeouts
again, so a dead Redis adds at most one (short, bounded) timeout to one request per
backoff period. The first call after the period tries Redis again: recovery needs no
action.

A command that Redis answered with an error reply (``OOM`` when `maxmemory` is reached
under `noeviction`, ``READONLY`` from a replica, ``WRONGTYPE``...) fails that call only,
with `RedisReplyError`: Redis is reachable, so other commands (reads, when writes are
refused) keep being sent and the link stays up.

At most `max_concurrent` (the pool's size) commands run at once; more wait for a
connection (bounded by the request deadline) instead of failing on an empty pool.

Callers decide what a failure means for them: the response cache is skipped (a refused
write is dropped), a `user_id` lookup answers 503 while Redis is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger(__name__)

T = TypeVar("T")


class RedisUnavailableError(RuntimeError):
    """Redis failed or is marked down; the message says which (no secrets: no URL)."""


class RedisReplyError(RedisUnavailableError):
    """Redis answered this one command with an error reply (OOM, READONLY, WRONGTYPE...).

    The link stays up. A subclass of `RedisUnavailableError`, so a caller that only asks
    "did the call fail" handles it too; one that cares (a read of a key of the wrong type
    is the stored data's fault, not Redis being away) catches it first.

    Args:
        message: what failed (no secrets).
        reply: Redis' error reply, e.g. ``WRONGTYPE Operation against a key holding the
            wrong kind of value``.
    """

    def __init__(self, message: str, reply: str) -> None:
        super().__init__(message)
        self.reply = reply


def make_client(
    url: str,
    *,
    socket_timeout_s: float,
    connect_timeout_s: float,
    retries: int,
    max_connections: int,
) -> aioredis.Redis:
    """An asyncio Redis client over its own bounded pool, with explicit timeouts/retries."""
    pool = aioredis.ConnectionPool.from_url(
        url,
        max_connections=max_connections,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=connect_timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.05, base=0.005), retries),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=30,
    )
    return aioredis.Redis.from_pool(pool)  # the client owns (and closes) the pool


class RedisLink:
    """A Redis client plus the up/down state shared by the feature store and the cache.

    Args:
        client: the asyncio client (see `make_client`).
        down_backoff_s: how long Redis is skipped after a failure.
        on_state: called with True/False when Redis comes up / goes down (metrics).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        down_backoff_s: float = 1.0,
        on_state: Callable[[bool], None] | None = None,
        max_concurrent: int | None = None,
    ) -> None:
        self.client = client
        self.down_backoff_s = down_backoff_s
        # At most the pool's size of commands at once: more would find the pool empty
        # (MaxConnectionsError) and, being a RedisError, mark a healthy Redis down.
        self._slots = asyncio.Semaphore(max_concurrent) if max_concurrent else None
        self._down_until = 0.0
        self._up: bool | None = None
        self._on_state = on_state
        self.last_error: str | None = None  # why Redis was last marked down
        self.last_reply_error: str | None = None  # the last error reply (the link stayed up)
        self.reply_errors = 0  # commands answered with an error reply since start

    @property
    def up(self) -> bool:
        """False while Redis is in its backoff period after a failure."""
        return time.monotonic() >= self._down_until

    @property
    def reachable(self) -> bool:
        """The outcome of the last call (True before the first one)."""
        return self._up is not False

    def _set_state(self, up: bool) -> None:
        if self._up is up:
            return
        self._up = up
        if up:
            logger.info("redis is reachable")
        else:
            logger.warning(
                "redis unavailable (%s); retrying in %.1fs", self.last_error, self.down_backoff_s
            )
        if self._on_state is not None:
            self._on_state(up)

    def mark_down(self, error: BaseException) -> None:
        self.last_error = f"{type(error).__name__}: {error}"
        self._down_until = time.monotonic() + self.down_backoff_s
        self._set_state(False)

    def _note_reply_error(self, error: ResponseError) -> None:
        # Logged when the reply changes, not per command: a full Redis refuses every write.
        described = f"{type(error).__name__}: {error}"
        self.reply_errors += 1
        if described != self.last_reply_error:
            logger.warning("redis refused a command (the link stays up): %s", described)
        self.last_reply_error = described

    async def call(self, command: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Run `command(client)`.

        Raises:
            RedisReplyError: Redis answered this command with an error reply (the link
                stays up).
            RedisUnavailableError: Redis is down, or could not be reached (marked down).
        """
        if not self.up:
            raise RedisUnavailableError("redis is unavailable (backing off after a failure)")
        async with self._slots or contextlib.nullcontext():
            if not self.up:  # it went down while this call waited for a connection
                raise RedisUnavailableError("redis is unavailable (backing off after a failure)")
            try:
                result = await command(self.client)
            except ResponseError as exc:  # an answer: Redis is reachable
                self._note_reply_error(exc)
                self._set_state(True)
                raise RedisReplyError(
                    f"redis refused the command: {type(exc).__name__}: {exc}", reply=str(exc)
                ) from exc
            except (RedisError, OSError) as exc:
                self.mark_down(exc)
                raise RedisUnavailableError(f"redis command failed: {type(exc).__name__}") from exc
        self._set_state(True)
        return result

    async def ping(self) -> bool:
        try:
            await self.call(lambda c: c.ping())
        except RedisUnavailableError:
            return False
        return True

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except Exception as exc:  # closing a dead connection may raise; nothing to do
            logger.debug("closing redis client: %s", exc)

    def describe(self) -> dict[str, Any]:
        return {
            "reachable": self.reachable,
            "backing_off": not self.up,
            "last_error": self.last_error,
            "reply_errors": self.reply_errors,
            "last_reply_error": self.last_reply_error,
        }
