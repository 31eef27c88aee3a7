"""Pure ASGI middlewares: API key, request body size and time limits, HTTP metrics; the
admission limit.

`APIKeyMiddleware` answers 401 to a /v1 request without the right ``X-API-Key`` from its
headers alone, before a byte of its body is read (the connection is then closed), so a
client without the key cannot make the service buffer or wait for anything.

`BodySizeLimitMiddleware` answers 413 before the application parses anything: at once
when ``Content-Length`` is over the limit, otherwise while reading, counting the bytes
of every body chunk (so a chunked body without a length is caught too). A body that has
not fully arrived `timeout_s` after the headers gets 408 and its connection is closed,
so slow senders cannot hold buffers and connections open. The body is read in full (it
is bounded in size and time) and replayed to the application.

`MetricsMiddleware` sits outside everything else, so 401, 413 and 429 answers are
counted too; the route label is the route's path template (``other`` for unknown paths,
so a scanner cannot blow up the label set).

`AdmissionLimiter` bounds the retrieval requests in flight; past the bound a request
gets `OverloadedError` (429 with Retry-After) at once instead of queueing without limit,
from `AdmissionGateMiddleware` before anything is parsed when the bound is already reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

from pydantic import SecretStr
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import (
    BodyTimeoutError,
    OverloadedError,
    PayloadTooLargeError,
    ServiceError,
    UnauthorizedError,
    error_bytes,
)
from service.metrics import ServiceMetrics

RETRIEVAL_PATHS = ("/v1/retrieve", "/v1/retrieve/batch", "/v1/embed", "/v1/embed/batch")
PROTECTED_PREFIX = "/v1/"  # what the API key guards
UNAUTHORIZED_MESSAGE = "missing or invalid API key"  # the same for a missing and a wrong key


def api_key_matches(given: bytes | None, expected: SecretStr | None) -> bool:
    """Whether `given` (the ``X-API-Key`` header's bytes) is the configured key, compared in
    constant time; any request matches when no key is configured.

    >>> key = SecretStr("0123456789abcdef")
    >>> api_key_matches(b"0123456789abcdef", key), api_key_matches(None, key)
    (True, False)
    >>> api_key_matches(None, None)
    True
    """
    if expected is None:
        return True
    return hmac.compare_digest(given or b"", expected.get_secret_value().encode())


def first_header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header `name` (lower case), as Starlette reads headers."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


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


class APIKeyMiddleware:
    """401 for a /v1 request whose ``X-API-Key`` header is missing or wrong, from the headers.

    It sits outside the body limits: the body of a refused request is never read, and the
    connection is closed after the answer. This is the check of record; the FastAPI routes'
    `service.dependencies.require_api_key` declares the key in the OpenAPI document (and
    checks it again, with the same comparison, `api_key_matches`).

    Args:
        app: the next ASGI application.
        api_key: the configured key (None: nothing is checked).
        routes: the route templates under /v1 (the metrics' route label of a 401).
    """

    def __init__(
        self, app: ASGIApp, api_key: SecretStr | None, routes: frozenset[str] = frozenset()
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.api_key is not None
            and scope["type"] == "http"
            and scope["path"].startswith(PROTECTED_PREFIX)
            and not api_key_matches(first_header(scope, b"x-api-key"), self.api_key)
        ):
            if scope["path"] in self.routes:
                scope["route"] = SimpleNamespace(path=scope["path"])  # the metrics' label
            await _send_error(send, UnauthorizedError(UNAUTHORIZED_MESSAGE))
            return
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """Refuse bodies over `max_bytes` with 413, and bodies slower than `timeout_s` with 408,
    before the app sees them.

    Args:
        app: the next ASGI application.
        max_bytes: the largest body accepted.
        timeout_s: the longest a body may take to arrive after the headers (None: no limit).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    def _too_large(self, size: str) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"request body is {size} bytes; the limit is {self.max_bytes} bytes"
        )

    def _too_slow(self, received: int) -> BodyTimeoutError:
        assert self.timeout_s is not None
        return BodyTimeoutError(
            f"the request body did not arrive within {self.timeout_s:g} s "
            f"({received} bytes received)"
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
        refusal: ServiceError | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client left before sending its body
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        refusal = self._too_large(f"more than {self.max_bytes}")
                        break
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            refusal = self._too_slow(size)
        if refusal is not None:
            await _send_error(send, refusal)  # and the connection is closed
            return
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
