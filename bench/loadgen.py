"""A lean HTTP/1.1 load generator for loopback benchmarks (stdlib asyncio, keep-alive).

Why not httpx: at hundreds of requests per second an httpx client spends about a
millisecond of CPU per request, on the same two cores as the server it measures. This
client writes a prepared request and reads the answer with one `readuntil` and one
`readexactly`, a few tens of microseconds per request, so the figures are the server's.

Usage (from another benchmark)::

    from loadgen import closed_loop, open_loop
    stats = asyncio.run(closed_loop("127.0.0.1", 8000, "/v1/retrieve", bodies, 8, 10.0, 1.0))

Only what the service speaks is supported: ``Content-Length`` answers (no chunked
encoding), keep-alive, one request in flight per connection. Every answer's status is
checked; anything but 200 counts as an error (by status), and a broken connection is
reopened. Loops are bounded in count and time, and only loopback hosts are accepted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Connection", "LoadResult", "closed_loop", "open_loop"]


def _check_loopback(host: str) -> None:
    if host == "localhost":
        return
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"load generation targets loopback addresses only; got {host!r}")


@dataclass
class LoadResult:
    """Latencies of the successful requests inside the measured window and the rest."""

    duration_s: float
    latencies_s: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)  # non-200 answers
    failures: int = 0  # connection errors and time-outs
    dropped: int = 0  # open loop: arrivals not sent (generator cap)
    response_bytes: int = 0

    def summary(self) -> dict[str, Any]:
        errors = sum(self.statuses.values()) + self.failures
        out: dict[str, Any] = {"requests": len(self.latencies_s), "errors": errors}
        if self.statuses:
            out["error_statuses"] = {str(k): v for k, v in sorted(self.statuses.items())}
        if self.dropped:
            out["dropped"] = self.dropped
        if not self.latencies_s:
            return out
        ms = np.asarray(self.latencies_s) * 1000.0
        out.update(
            qps=round(len(ms) / self.duration_s, 1),
            mean_ms=round(float(ms.mean()), 2),
            p50_ms=round(float(np.percentile(ms, 50)), 2),
            p95_ms=round(float(np.percentile(ms, 95)), 2),
            p99_ms=round(float(np.percentile(ms, 99)), 2),
            max_ms=round(float(ms.max()), 2),
            mean_response_bytes=round(self.response_bytes / len(ms)),
        )
        return out


class Connection:
    """One keep-alive connection; `post` sends a prepared request and reads the answer
    (its ``Retry-After`` header, if any, is kept in `retry_after`)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.retry_after: str | None = None

    async def _open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def post(self, request: bytes) -> tuple[int, int]:
        """(status, body length) of the answer to a complete request message."""
        if self.writer is None:
            await self._open()
        assert self.reader is not None and self.writer is not None
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        close = False
        self.retry_after = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
            elif name == b"retry-after":
                self.retry_after = value.strip().decode()
        if length:
            await self.reader.readexactly(length)
        if close:
            self.close()
        return status, length


def _requests(
    host: str, port: int, path: str, bodies: list[bytes], headers: dict[str, str]
) -> list[bytes]:
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return [
        (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
        ).encode()
        + body
        for body in bodies
    ]


async def _send(
    conn: Connection, request: bytes, result: LoadResult, timeout_s: float
) -> tuple[bool, int]:
    try:
        status, size = await asyncio.wait_for(conn.post(request), timeout_s)
    except (
        OSError,
        asyncio.IncompleteReadError,
        asyncio.LimitOverrunError,
        TimeoutError,
        ValueError,
    ):
        conn.close()
        return False, -1
    return status == 200, status if status != 200 else size


def _record(result: LoadResult, ok: bool, code: int, latency: float, measured: bool) -> None:
    if not measured:
        return
    if ok:
        result.latencies_s.append(latency)
        result.response_bytes += code
    elif code < 0:
        result.failures += 1
    else:
        result.statuses[code] += 1


async def closed_loop(
    host: str,
    port: int,
    path: str,
    bodies: list[bytes],
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    *,
    headers: dict[str, str] | None = None,
    timeout_s: float = 30.0,
) -> LoadResult:
    """`concurrency` connections, each sending its next request as soon as one answers."""
    _check_loopback(host)
    requests = _requests(host, port, path, bodies, headers or {})
    result = LoadResult(duration_s=duration_s)
    start = time.perf_counter()
    measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s

    async def worker(offset: int) -> None:
        conn = Connection(host, port)
        i = offset
        try:
            while (sent := time.perf_counter()) < stop_at:
                ok, code = await _send(conn, requests[i % len(requests)], result, timeout_s)
                _record(result, ok, code, time.perf_counter() - sent, sent >= measure_from)
                i += concurrency
        finally:
            conn.close()

    await asyncio.gather(*(worker(c) for c in range(concurrency)))
    return result


async def open_loop(
    host: str,
    port: int,
    path: str,
    bodies: list[bytes],
    rate: float,
    duration_s: float,
    warmup_s: float,
    *,
    connections: int = 64,
    cap: int = 4096,
    headers: dict[str, str] | None = None,
    timeout_s: float = 30.0,
) -> LoadResult:
    """Requests scheduled at a fixed rate; latency counts from each scheduled send time.

    At most `connections` requests are on the wire (one per connection); later arrivals
    wait for a free connection and that wait counts. Past `cap` waiting or outstanding
    requests the generator drops arrivals (reported as `dropped`).
    """
    _check_loopback(host)
    requests = _requests(host, port, path, bodies, headers or {})
    result = LoadResult(duration_s=duration_s)
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(Connection(host, port))
    start = time.perf_counter() + 0.05
    measure_from = start + warmup_s
    total = int((warmup_s + duration_s) * rate)
    pending: set[asyncio.Task[None]] = set()

    async def one(i: int, scheduled: float) -> None:
        conn = await idle.get()
        try:
            ok, code = await _send(conn, requests[i % len(requests)], result, timeout_s)
        finally:
            idle.put_nowait(conn)
        _record(result, ok, code, time.perf_counter() - scheduled, scheduled >= measure_from)

    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(pending) >= cap:
            result.dropped += 1
            continue
        task = asyncio.create_task(one(i, scheduled))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.gather(*list(pending))
    while not idle.empty():
        idle.get_nowait().close()
    return result
