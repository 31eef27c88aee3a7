"""Running the app under uvicorn with a graceful shutdown whose first step is readiness.

The app loads its model and index in the background (`create_app(load_in_background=True)`):
the socket is open during a cold start; when the loading fails the server stops and
`serve` raises `CommandError` (exit status 1).

On SIGTERM/SIGINT, `ServiceServer` marks the service as draining (``/readyz`` answers
503 at once), keeps serving for `shutdown_drain_s` so load balancers stop routing to it,
then lets uvicorn stop: it closes the listening socket, waits up to `graceful_timeout_s`
for in-flight requests to finish, and runs the lifespan shutdown (which drains the
micro-batch queue). A second signal stops at once.
"""

from __future__ import annotations

import logging
import threading
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from service.settings import ServiceSettings

logger = logging.getLogger(__name__)


class ServiceServer(uvicorn.Server):
    """uvicorn's server with readiness-first shutdown (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_s = drain_s
        self._signalled = False

    def mark_draining(self) -> None:
        services = getattr(self.app.state, "services", None)
        if services is not None:
            services.draining = True

    async def on_tick(self, counter: int) -> bool:
        if self.app.state.load_error is not None:
            return True  # the background loading failed: nothing to serve, stop
        return await super().on_tick(counter)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._signalled or self.drain_s <= 0:
            self.mark_draining()
            super().handle_exit(sig, frame)
            return
        self._signalled = True
        self.mark_draining()
        logger.info("signal %s: not ready; draining for %.1fs before stopping", sig, self.drain_s)
        timer = threading.Timer(self.drain_s, super().handle_exit, args=(sig, frame))
        timer.daemon = True
        timer.start()


def uvicorn_config(app: FastAPI, settings: ServiceSettings, **overrides: Any) -> uvicorn.Config:
    """uvicorn's configuration from the settings (`overrides` win: tests set the log level).

    `max_connections` bounds the open connections: uvicorn answers a request 503 (and
    closes its connection) when the open connections, that one included, reach its
    `limit_concurrency`, so that is one more than the connections served at once.
    """
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "limit_concurrency": settings.max_connections + 1,
        "access_log": settings.access_log,
        "timeout_graceful_shutdown": round(settings.graceful_timeout_s),
        "lifespan": "on",
        "log_config": None,  # keep the CLI's logging setup
        "server_header": False,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


def apply_thread_settings(settings: ServiceSettings) -> None:
    """torch's intra-op threads and FAISS's OpenMP threads of this process (the batch
    worker threads apply `faiss_threads` again on their own thread: `Retriever`)."""
    import faiss
    import torch

    torch.set_num_threads(settings.torch_threads)
    faiss.omp_set_num_threads(settings.faiss_threads)


def serve(settings: ServiceSettings) -> None:
    """Build the app and run it in this process until a signal stops it (several
    `workers`: `service.workers.serve_workers` starts and supervises them instead)."""
    from service.app import create_app

    apply_thread_settings(settings)
    app = create_app(settings, load_in_background=True)
    server = ServiceServer(uvicorn_config(app, settings), app, settings.shutdown_drain_s)
    server.run()
    if app.state.load_error is not None:
        from retrieval.cli import CommandError

        raise CommandError(
            f"the service could not load its model and index: {app.state.load_error}"
        )
