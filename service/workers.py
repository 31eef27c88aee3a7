"""`retrieval serve --workers N`: N server processes listening on one port.

Usage::

    retrieval serve --model M --index R --data D --workers 2
    RETRIEVAL_WORKERS=2 retrieval serve --model M --index R

The `retrieval serve` process becomes a supervisor: it reserves the port, then starts N
worker processes (multiprocessing's "spawn": a fresh interpreter each, nothing inherited by
fork) that each run the whole service (app, model, index, micro-batcher and its
`batch_workers` threads) under their own uvicorn `ServiceServer`, on a socket of their own
bound to the port with ``SO_REUSEPORT``: the kernel hands each new connection to one of the
listening workers by a hash of its addresses, so connections spread evenly on average
whatever their timing (a handful of connections can still fall unevenly by chance). (One
socket shared by all workers was measured first: a client opening its 16
keep-alive connections at once had all of them accepted by one worker in 2 trials of 5, as
the first worker to wake accepts every pending connection, and served 0.6x the requests.)
A worker listens only once it is loaded, and a worker that stops or dies leaves the group,
so connections go only to workers that can answer them. Everything of one worker stays in
it: its admission limit (`max_in_flight` is per worker), its embedded feature store, its
code caches, its micro-batches. Redis, when configured, is shared.

Memory: index versions are read memory-mapped (`ServiceSettings.index_mmap`, on by default
with several workers), so an IVF index's lists are one copy in the page cache for every
worker; the model, the code caches and the row -> id table are per worker.

Metrics: the supervisor makes a private directory for prometheus_client's multi-process
files (and the workers' "loaded" marks) and removes it at exit; /metrics, whichever worker
answers it, reports every worker (`service.metrics`).

Lifecycle:
    * start-up: a worker loads its model and index before it accepts a connection, so no
      request ever meets a worker that is still loading (one process alone answers /healthz
      during its cold start instead; with workers, the port refuses connections until the
      first worker is loaded and listens). If a worker of the first
      start cannot load, the supervisor stops the others and `serve` fails (exit status 1):
      every worker would meet the same error.
    * a worker that exits later (killed, crashed) is replaced; the others keep serving, and
      only that worker's connections are lost (in flight or queued for it: reset). The
      replacement takes no traffic until it is loaded. Replacements that keep exiting
      within `STABLE_S` are restarted after a delay that doubles from 1 s up to
      `MAX_BACKOFF_S`.
    * SIGTERM / SIGINT: the supervisor forwards the signal to every worker, each stopping
      as `ServiceServer` does (readiness off, the drain, in-flight requests finished; a
      connection the kernel queued for a worker in the instant its socket closes is reset);
      a second signal is forwarded too (stop at once).
      Workers still running `shutdown_drain_s + graceful_timeout_s + STOP_MARGIN_S` after
      the first signal are killed. A worker whose supervisor is gone stops by itself.
"""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.context import SpawnProcess
from pathlib import Path
from types import FrameType

from retrieval.cli import LOG_FORMAT, CommandError
from service.settings import ServiceSettings

logger = logging.getLogger(__name__)

LOAD_FAILED = 3  # a worker's exit status when its model or index could not be loaded
STABLE_S = 30.0  # a worker alive this long resets the restart backoff
MAX_BACKOFF_S = 30.0
STOP_MARGIN_S = 10.0
_POLL_S = 0.1

_spawn = multiprocessing.get_context("spawn")


def port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with ``SO_REUSEPORT``, not listening yet: a
    worker's (uvicorn listens on it once the worker is loaded), or the supervisor's
    reservation (never listening: no connection is ever handed to it, but a program that
    binds the port without ``SO_REUSEPORT`` is refused for as long as the supervisor runs).

    Raises:
        CommandError: the address cannot be bound (in use, not local, no permission).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def port_lock_path(port: int) -> Path:
    """The lock file of a supervisor on `port` (in the system's temporary directory)."""
    return Path(tempfile.gettempdir()) / f"retrieval-serve-{port}.lock"


def lock_port(port: int) -> int:
    """An exclusive lock on this port's lock file (`port_lock_path`; the supervisor removes
    the file as it stops): a second `retrieval serve --workers` on the same port, which
    ``SO_REUSEPORT`` would let join the first one's group and take half its connections,
    is refused instead.

    Raises:
        CommandError: another supervisor holds the port.
    """
    path = port_lock_path(port)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise CommandError(
            f"cannot listen on port {port}: another `retrieval serve --workers` holds it ({path})"
        ) from exc
    return fd


def run_worker(
    settings: ServiceSettings,
    loaded_mark: Path,
    supervisor_pid: int,
    log_level: int,
) -> None:
    """One worker process (the target of a spawned process).

    Args:
        settings: the supervisor's settings.
        loaded_mark: a file the worker creates once its model and index are loaded.
        supervisor_pid: the worker stops (gracefully) when its parent is no longer this.
        log_level: the supervisor's logging level.
    """
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    from service.app import create_app
    from service.server import ServiceServer, apply_thread_settings, uvicorn_config

    apply_thread_settings(settings)
    app = create_app(settings, on_loaded=loaded_mark.touch)  # loads before accepting
    server = ServiceServer(uvicorn_config(app, settings), app, settings.shutdown_drain_s)
    # uvicorn raises the stop signal again once it has stopped, to die of it; a worker
    # returns instead, so its exit handlers run (status 0 after a signalled stop)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _returned)
    threading.Thread(
        target=_stop_when_orphaned, args=(supervisor_pid,), name="orphan-watch", daemon=True
    ).start()
    server.run(sockets=[port_socket(settings.host, settings.port)])
    if app.state.load_error is not None or not loaded_mark.exists():
        sys.exit(LOAD_FAILED)


def _returned(sig: int, frame: FrameType | None) -> None:
    """The worker's own handler of the signal uvicorn raises again after its stop."""


def _stop_when_orphaned(supervisor_pid: int) -> None:
    while os.getppid() == supervisor_pid:
        time.sleep(1.0)
    logger.warning("the supervisor (pid %d) is gone: stopping", supervisor_pid)
    os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class _Slot:
    """One worker position: the process serving it now and its restart state."""

    process: SpawnProcess
    loaded_mark: Path
    started: float
    backoff_s: float = 0.0
    restart_at: float | None = None  # set while the slot waits to restart its worker


class Supervisor:
    """Starts, watches, replaces and stops the workers (see the module docstring).

    Args:
        settings: the service settings (`workers` > 1).
    """

    def __init__(self, settings: ServiceSettings) -> None:
        if settings.workers < 2:
            raise ValueError(f"`workers` must be >= 2 for a supervisor; got {settings.workers}")
        self.settings = settings
        self.slots: list[_Slot] = []
        self.ever_loaded = False
        self._signals: list[int] = []
        self._reservation: socket.socket | None = None
        self._stop_deadline: float | None = None
        self._state_dir: Path | None = None
        self._generation = 0

    def run(self) -> None:
        """Serve until a signal stops every worker.

        Raises:
            CommandError: the socket cannot be bound, or the first workers could not load.
        """
        lock = lock_port(self.settings.port)
        try:
            self._reservation = port_socket(self.settings.host, self.settings.port)
        except CommandError:
            port_lock_path(self.settings.port).unlink(missing_ok=True)
            os.close(lock)
            raise
        metrics_dir = tempfile.mkdtemp(prefix="retrieval-metrics-")
        self._state_dir = Path(metrics_dir)
        # prometheus_client reads this when a worker imports it (`service.metrics`)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            logger.info(
                "supervisor %d: %d workers on %s:%d",
                os.getpid(),
                self.settings.workers,
                self.settings.host,
                self.settings.port,
            )
            self.slots = [self._start() for _ in range(self.settings.workers)]
            failure = self._watch(metrics_dir)
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._reservation.close()
            # removed while still locked: a newcomer that opened it meanwhile is refused,
            # one that comes later creates a new file
            port_lock_path(self.settings.port).unlink(missing_ok=True)
            os.close(lock)
            shutil.rmtree(metrics_dir, ignore_errors=True)
        if failure is not None:
            raise CommandError(failure)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self._signals.append(sig)

    def _start(self, slot: _Slot | None = None) -> _Slot:
        assert self._state_dir is not None
        self._generation += 1
        mark = self._state_dir / f"loaded-{self._generation}"  # not *.db: no metrics file
        process = _spawn.Process(
            target=run_worker,
            args=(self.settings, mark, os.getpid(), logging.root.level),
            name="retrieval-worker",
            daemon=False,
        )
        process.start()
        logger.info("worker %d started%s", process.pid, " (a replacement)" if slot else "")
        if slot is None:
            return _Slot(process, mark, time.monotonic())
        slot.process, slot.loaded_mark, slot.started, slot.restart_at = (
            process,
            mark,
            time.monotonic(),
            None,
        )
        return slot

    def _watch(self, metrics_dir: str) -> str | None:
        """The supervision loop; the reason to fail, or None after a signalled stop."""
        from prometheus_client.multiprocess import mark_process_dead

        while True:
            self._forward_signals()
            if self._stop_deadline is not None:
                return None
            for slot in self.slots:
                if not self.ever_loaded and slot.loaded_mark.exists():
                    self.ever_loaded = True
                if slot.restart_at is not None:
                    if time.monotonic() >= slot.restart_at:
                        self._start(slot)
                    continue
                code = slot.process.exitcode
                if code is None:
                    continue
                mark_process_dead(slot.process.pid, metrics_dir)
                if code == LOAD_FAILED and not self.ever_loaded:
                    return (
                        f"worker {slot.process.pid} could not load the model and index "
                        "(its log above says why); stopping the others"
                    )
                lived = time.monotonic() - slot.started
                slot.backoff_s = (
                    0.0 if lived >= STABLE_S else min(max(2 * slot.backoff_s, 1.0), MAX_BACKOFF_S)
                )
                logger.error(
                    "worker %d exited with status %s after %.1fs%s; replacing it in %.1fs",
                    slot.process.pid,
                    code,
                    lived,
                    " (it could not load the model and index)" if code == LOAD_FAILED else "",
                    slot.backoff_s,
                )
                slot.restart_at = time.monotonic() + slot.backoff_s
            time.sleep(_POLL_S)

    def _forward_signals(self) -> None:
        while self._signals:
            sig = self._signals.pop(0)
            if self._stop_deadline is None:
                s = self.settings
                self._stop_deadline = (
                    time.monotonic() + s.shutdown_drain_s + s.graceful_timeout_s + STOP_MARGIN_S
                )
                logger.info("signal %s: stopping %d workers", sig, len(self.slots))
            for slot in self.slots:
                if slot.process.exitcode is None and slot.process.pid is not None:
                    os.kill(slot.process.pid, sig)

    def _stop_all(self) -> None:
        """Wait for the signalled workers (killing them past the deadline); without a
        signal (a failed start), stop them at once."""
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + STOP_MARGIN_S
            for slot in self.slots:
                if slot.process.exitcode is None:
                    slot.process.terminate()
        for slot in self.slots:
            while slot.process.exitcode is None and time.monotonic() < self._stop_deadline:
                self._forward_signals()  # a second signal still reaches the workers
                slot.process.join(_POLL_S)
            if slot.process.exitcode is None:
                logger.error("worker %d did not stop in time: killed", slot.process.pid)
                slot.process.kill()
                slot.process.join()


def serve_workers(settings: ServiceSettings) -> None:
    """`retrieval serve` with `settings.workers` > 1 (see the module docstring)."""
    Supervisor(settings).run()
