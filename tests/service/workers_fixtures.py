"""Helpers of the multi-process serving tests: `retrieval serve --workers N` as a child
process, its workers found in /proc, and its metrics read whole or one worker at a time."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from service_fixtures import free_port, wait_until

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def children(pid: int) -> list[int]:
    """The supervisor's worker processes (its spawned children, not the resource tracker)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    workers = []
    for child in found:
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            workers.append(child)
    return workers


def listening(pid: int, port: int) -> bool:
    """Whether process `pid` holds a socket listening on `port` (its fds against /proc/net/tcp*)."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    except OSError:
        return False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port and inode in inodes:
                    return True
    return False


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample of the exposition `text` (0 when absent)."""
    pattern = rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$"
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else 0.0


def worker_batch_sum(metrics_dir: Path, pid: int, scratch: Path) -> float:
    """`retrieval_batch_size_sum` of one worker alone (its files, collected apart)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    alone = scratch / f"metrics-{pid}"
    alone.mkdir()
    for path in metrics_dir.glob(f"*_{pid}.db"):
        shutil.copy(path, alone / path.name)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(alone))
    return metric(generate_latest(registry).decode(), "retrieval_batch_size_sum")


class Supervised:
    """`retrieval serve --workers N` as a child process, its log in a file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log = log
        command = [sys.executable, "-m", "retrieval", "serve", *args, "--port", str(self.port)]
        with log.open("wb") as handle:
            self.process = subprocess.Popen(
                command, env={**ENV, **(env or {})}, stdout=handle, stderr=subprocess.STDOUT
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, workers: int) -> list[int]:
        """Wait until `workers` workers run, each listens on the port (a worker listens only
        once loaded), and /readyz answers 200; their pids."""

        def ready() -> bool:
            if self.process.poll() is not None:
                return True
            running = children(self.process.pid)
            if len(running) != workers or not all(listening(p, self.port) for p in running):
                return False
            try:
                codes = {httpx.get(f"{self.url}/readyz", timeout=2).status_code for _ in range(10)}
            except httpx.HTTPError:
                return False
            return codes == {200}

        assert wait_until(ready, 120, interval_s=0.2), self.log.read_text()[-3000:]
        assert self.process.poll() is None, self.log.read_text()[-3000:]
        return children(self.process.pid)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        finally:
            self.kill()

    def kill(self) -> None:
        for pid in children(self.process.pid) if self.process.poll() is None else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
