"""Pure ASGI middlewares: request body size limit and HTTP metrics; the admission limit.

`BodySizeLimitMiddleware` answers 413 before the application parses anything: at once
when ``Content-Length`` is over the limit, otherwise while reading, counting the bytes
of every body chunk (so a chunked body without a length is caught too). The body is
read in full (it is bounded) and replayed to the application.

`MetricsMiddleware` sits outside everything else, so 401, 413 and 429 answers are
counted too; the route label is the route's path template (``other`` for unknown paths,
so a scanner cannot blow up the label set).

`AdmissionLimiter` bounds the retrieval requests in flight; past the bound a request
gets `OverloadedError` (429 with Retry-After) at once instead of queueing without limit.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import OverloadedError, PayloadTooLargeError, error_bytes
from service.metrics import ServiceMetrics


class AdmissionLimiter:
    """At most `limit` admitted units at once (a retrieval query is one unit).

    >>> limiter = AdmissionLimiter(limit=2, retry_after_s=1)
    >>> with limiter.admit(2):
    ...     limiter.in_flight
    2
    >>> limiter.in_flight
    0
    """

    def __init__(
        self, limit: int, retry_after_s: int, metrics: ServiceMetrics | None = None
    ) -> None:
        if limit < 1:
            raise ValueError(f"`limit` must be >= 1; got {limit}")
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self._metrics = metrics

    @contextlib.contextmanager
    def admit(self, units: int = 1) -> Iterator[None]:
        """Hold `units` for the duration of the block, or raise `OverloadedError`."""
        if self.in_flight + units > self.limit:
            if self._metrics is not None:
                self._metrics.rejected.labels(reason="overload").inc()
            raise OverloadedError(
                f"too many requests in flight ({self.in_flight} of {self.limit}); retry later",
                retry_after_s=self.retry_after_s,
            )
        self.in_flight += units
        if self._metrics is not None:
            self._metrics.in_flight.set(self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= units
            if self._metrics is not None:
                self._metrics.in_flight.set(self.in_flight)


async def _send_error(send: Send, error: PayloadTooLargeError) -> None:
    body = error_bytes(error)
    await send(
        {
            "type": "http.response.start",
            "status": error.status_code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodySizeLimitMiddleware:
    """Refuse bodies over `max_bytes` with 413 before the app sees them."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: str) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"request body is {size} bytes; the limit is {self.max_bytes} bytes"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes:
                    await _send_error(send, self._too_large(str(declared)))
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _send_error(send, self._too_large(f"more than {self.max_bytes}"))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class MetricsMiddleware:
    """Count every HTTP answer and time it, by route template, method and status."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route: Any = scope.get("route")
            label = getattr(route, "path", None) or "other"
            method = scope.get("method", "")
            seconds = time.perf_counter() - started
            self.metrics.requests.labels(route=label, method=method, status=str(status)).inc()
            self.metrics.latency.labels(route=label, method=method, status=str(status)).observe(
                seconds
            )
