"""Pure ASGI middlewares: request body size limit and HTTP metrics; the admission limit.

`BodySizeLimitMiddleware` answers 413 before the application parses anything: at once
when ``Content-Length`` is over the limit, otherwise while reading, counting the bytes
of every body chunk (so a chunked body without a length is caught too). The body is
read in full (it is bounded) and replayed to the application.

`MetricsMiddleware` sits outside everything else, so 401, 413 and 429 answers are
counted too; the route label is the route's path template (``other`` for unknown paths,
so a scanner cannot blow up the label set).

`AdmissionLimiter` bounds the retrieval requests in flight; past the bound a request
gets `OverloadedError` (429 with Retry-After) at once instead of queueing without limit,
from `AdmissionGateMiddleware` before anything is parsed when the bound is already reached.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import OverloadedError, PayloadTooLargeError, ServiceError, error_bytes
from service.metrics import ServiceMetrics

RETRIEVAL_PATHS = ("/v1/retrieve", "/v1/retrieve/batch")


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

    def refuse(self) -> OverloadedError:
        """The error of a refused request (counted in the metrics)."""
        if self._metrics is not None:
            self._metrics.rejected.labels(reason="overload").inc()
        return OverloadedError(
            f"too many requests in flight ({self.in_flight} of {self.limit}); retry later",
            retry_after_s=self.retry_after_s,
        )

    @contextlib.contextmanager
    def admit(self, units: int = 1) -> Iterator[None]:
        """Hold `units` for the duration of the block, or raise `OverloadedError`."""
        if self.in_flight + units > self.limit:
            raise self.refuse()
        self.in_flight += units
        if self._metrics is not None:
            self._metrics.in_flight.set(self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= units
            if self._metrics is not None:
                self._metrics.in_flight.set(self.in_flight)


async def _send_error(send: Send, error: ServiceError, *, close: bool = True) -> None:
    body = error_bytes(error)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives `body` (already read) once, then what the connection sends."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class AdmissionGateMiddleware:
    """Answer 429 to retrieval requests at once while the admission limit is reached.

    The route handlers admit requests (`AdmissionLimiter.admit`); this gate only makes the
    refusal cheap under overload: no JSON parsing, validation or dependency resolution,
    so the excess costs the service little CPU and gets its answer fast. It sits inside
    `BodySizeLimitMiddleware` (the bounded body is already read, the connection is kept).
    """

    def __init__(self, app: ASGIApp, paths: tuple[str, ...] = RETRIEVAL_PATHS) -> None:
        self.app = app
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths:
            services = getattr(scope["app"].state, "services", None)
            limiter = services.limiter if services is not None else None
            if limiter is not None and limiter.in_flight >= limiter.limit:
                scope["route"] = SimpleNamespace(path=scope["path"])  # the metrics' route label
                await _send_error(send, limiter.refuse(), close=False)
                return
        await self.app(scope, receive, send)


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
        await self.app(scope, replay_body(b"".join(chunks), receive), send)


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
