"""Helpers of the reliability suite: fault injection into a live service, a bounded async
load generator, process figures from /proc, and `retrieval serve` as a child process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from service_fixtures import wait_until

# --------------------------------------------------------------------------- fault injection


class SearchSpy:
    """Counts FAISS searches of whatever index version serves (wraps `ServingIndex.search`)."""

    def __init__(self, services: Any) -> None:
        self.calls = 0
        self._lock = threading.Lock()
        current = services.index_manager.current
        original = current.search

        def search(query_emb: Any, k: int) -> Any:
            with self._lock:
                self.calls += 1
            return original(query_emb, k)

        current.search = search


# --------------------------------------------------------------------------- load


@dataclass
class Outcome:
    """One request of a load run: when it was sent, how long it took, what came back."""

    sent: float
    seconds: float
    status: int  # 0: no HTTP answer (the `error` says why)
    body: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    kind: str = ""


async def run_load(
    url: str,
    make_body: Callable[[int], tuple[str, dict[str, Any]]],
    *,
    clients: int,
    stop: asyncio.Event,
    max_requests: int = 20_000,
    timeout_s: float = 10.0,
    keepalive: bool = True,
) -> list[Outcome]:
    """`clients` closed-loop clients posting ``make_body(i) -> (kind, body)`` to /v1/retrieve
    until `stop` is set or `max_requests` were sent (always bounded)."""
    outcomes: list[Outcome] = []
    counter = iter(range(max_requests))
    limits = httpx.Limits(max_keepalive_connections=clients if keepalive else 0)

    async def client_loop() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
            while not stop.is_set():
                i = next(counter, None)
                if i is None:
                    return
                kind, body = make_body(i)
                sent = time.monotonic()
                try:
                    response = await client.post("/v1/retrieve", json=body)
                except httpx.HTTPError as exc:
                    outcomes.append(
                        Outcome(
                            sent, time.monotonic() - sent, 0, error=type(exc).__name__, kind=kind
                        )
                    )
                    continue
                payload = response.json() if response.content else {}
                outcomes.append(
                    Outcome(sent, time.monotonic() - sent, response.status_code, payload, kind=kind)
                )

    await asyncio.gather(*(client_loop() for _ in range(clients)))
    return outcomes


def p99(values: list[float]) -> float:
    return float(np.percentile(values, 99)) if values else float("nan")


# --------------------------------------------------------------------------- processes


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (default: this one), from /proc."""
    status = Path(f"/proc/{pid or os.getpid()}/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc status")


class ServeProcess:
    """`retrieval serve` in a child process on loopback (real signals, real exit status)."""

    def __init__(self, args: list[str], env: Mapping[str, str] | None = None) -> None:
        self.args = args
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.port = int(args[args.index("--port") + 1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log: Path) -> ServeProcess:
        command = [sys.executable, "-m", "retrieval.cli", "serve", *self.args]
        with log.open("wb") as handle:
            self.process = subprocess.Popen(
                command, env=self.env, stdout=handle, stderr=subprocess.STDOUT
            )

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                return True
            try:
                return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        if not wait_until(ready, 90, interval_s=0.1) or self.process.poll() is not None:
            self.kill()
            raise RuntimeError(f"`retrieval serve` did not become ready: {log.read_text()[-2000:]}")
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
