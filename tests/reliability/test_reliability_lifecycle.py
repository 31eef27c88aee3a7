"""Rows 6, 15 and 16 of the reliability suite: the request deadline under a slow query tower,
SIGTERM under load (a real `retrieval serve` process, a real signal), and the cold start."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from reliability_fixtures import ServeProcess, run_load
from service_fixtures import LiveServer, free_port, live_server, slow_embed, wait_until

import service.app as service_app
from service.settings import ServiceSettings

# --------------------------------------------------------------------------- row 6


def test_row6_slow_tower_gives_504_at_the_deadline_and_frees_the_slots(
    make_settings: Callable[..., ServiceSettings],
) -> None:
    # (one 504 alone: tests/service/test_service_live.py::test_deadline_answers_504)
    timeout_s = 0.3
    settings = make_settings(  # one batch worker: the second request queues behind the first
        request_timeout_s=timeout_s,
        max_in_flight=2,
        max_batch_size=1,
        max_wait_ms=0,
        batch_workers=1,
    )
    with live_server(settings) as server:
        services = server.services
        undo = slow_embed(services, 1.0, batches=1)  # the first batch takes a second

        async def two_at_once() -> list[tuple[int, float]]:
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:

                async def one() -> tuple[int, float]:
                    started = time.monotonic()
                    response = await client.post("/v1/retrieve", json={"query": {}, "k": 5})
                    return response.status_code, time.monotonic() - started

                return list(await asyncio.gather(one(), one()))

        answers = asyncio.run(two_at_once())
        # both slots were taken (one request in the slow batch, one queued behind it)
        assert [code for code, _ in answers] == [504, 504]
        for _, seconds in answers:
            assert timeout_s <= seconds < timeout_s + 0.25  # at the deadline, not after the batch
        assert services.limiter.in_flight == 0  # released at the 504, the batch still running
        assert services.batcher.in_batch == 1
        assert wait_until(lambda: services.batcher.in_batch == 0, 5)
        assert services.batcher.skipped_cancelled >= 1  # the queued one never ran
        # both slots are free again: two concurrent requests are admitted and answered
        after = asyncio.run(two_at_once())
        assert [code for code, _ in after] == [200, 200]
        undo()
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'retrieval_rejected_total{reason="timeout"} 2.0' in metrics
        assert 'retrieval_rejected_total{reason="overload"} 0.0' in metrics


# --------------------------------------------------------------------------- row 5 (short)


def test_row5_short_excess_is_refused_before_parsing_with_retry_after(
    make_settings: Callable[..., ServiceSettings],
) -> None:
    """Short form (make soak measures 3x load): while the admission limit is reached, the
    excess gets 429 + Retry-After at once, before its body is even parsed."""
    settings = make_settings(max_in_flight=1, retry_after_s=2, max_wait_ms=0)
    garbage = {"content-type": "application/json"}
    with live_server(settings) as server:
        services = server.services
        undo = slow_embed(services, 0.8, batches=1)

        async def scenario() -> tuple[httpx.Response, list[tuple[httpx.Response, float]]]:
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
                held = asyncio.create_task(client.post("/v1/retrieve", json={"query": {}, "k": 3}))
                while services.limiter.in_flight < 1:
                    await asyncio.sleep(0.005)
                refused = []
                for content in (b"not json at all", b'{"query": {}, "k": 3}'):
                    started = time.monotonic()
                    response = await client.post("/v1/retrieve", content=content, headers=garbage)
                    refused.append((response, time.monotonic() - started))
                return await held, refused

        held, refused = asyncio.run(scenario())
        undo()
        assert held.status_code == 200
        for response, seconds in refused:
            assert response.status_code == 429 and seconds < 0.3  # fast, not after the batch
            assert response.headers["retry-after"] == "2"
            assert response.json()["error"]["code"] == "overloaded"
        # with the slot free, the same garbage is parsed (422): the 429 came before parsing
        after = httpx.post(f"{server.url}/v1/retrieve", content=b"not json at all", headers=garbage)
        assert after.status_code == 422
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'retrieval_rejected_total{reason="overload"} 2.0' in metrics
        assert 'requests_total{method="POST",route="/v1/retrieve",status="429"} 2.0' in metrics


# --------------------------------------------------------------------------- row 16


def test_row16_cold_start_answers_healthz_and_503_until_loaded(
    make_settings: Callable[..., ServiceSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    original = service_app._load_blocking

    def gated_load(*args: Any, **kwargs: Any) -> Any:
        assert gate.wait(30), "the test never released the loading"
        return original(*args, **kwargs)

    monkeypatch.setattr(service_app, "_load_blocking", gated_load)
    server = LiveServer(make_settings()).start(wait_ready=False)
    health: list[int] = []
    watching = threading.Event()

    def watch_health() -> None:  # /healthz polled through the whole start
        with httpx.Client(base_url=server.url, timeout=5) as client:
            while not watching.is_set():
                health.append(client.get("/healthz").status_code)
                time.sleep(0.01)

    watcher = threading.Thread(target=watch_health)
    watcher.start()
    try:
        for _ in range(3):  # while loading: not ready, and /v1 says so cleanly
            ready = httpx.get(f"{server.url}/readyz")
            assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
            assert ready.json()["reason"] == "model and index not loaded"
            query = httpx.post(f"{server.url}/v1/retrieve", json={"query": {}, "k": 3})
            assert query.status_code == 503 and query.json()["error"]["code"] == "not_ready"
            assert query.headers["retry-after"] == "1"
            assert httpx.get(f"{server.url}/v1/info").status_code == 503
        assert httpx.get(f"{server.url}/openapi.json").status_code == 200
        assert server.app.state.services is None
        gate.set()
        assert wait_until(lambda: httpx.get(f"{server.url}/readyz").status_code == 200, 30)
        answer = httpx.post(f"{server.url}/v1/retrieve", json={"query": {}, "k": 3})
        assert answer.status_code == 200 and len(answer.json()["ids"]) == 3
    finally:
        gate.set()
        watching.set()
        watcher.join(timeout=10)
        server.stop()
    assert len(health) >= 5 and set(health) == {200}


# --------------------------------------------------------------------------- row 15 (short)


def test_row15_short_sigterm_under_load_fails_no_admitted_request(
    tiny_bundle: Path, tiny_index: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    """Short form (make soak runs it longer): 6 clients, one new connection per request, a
    real SIGTERM to a real `retrieval serve`; readiness flips first, every request the server
    took is answered 200 (in flight or sent during the drain), and the process exits within
    the grace period."""
    port = free_port()
    drain_s, grace_s = 0.5, 5
    args = ["--model", str(tiny_bundle), "--index", str(tiny_index), "--data", str(tiny_dataset)]
    service = ServeProcess(
        [*args, "--port", str(port)],
        env={
            "RETRIEVAL_SHUTDOWN_DRAIN_S": str(drain_s),
            "RETRIEVAL_GRACEFUL_TIMEOUT_S": str(grace_s),
        },
    ).start(tmp_path / "serve.log")
    assert service.process is not None
    readiness: list[tuple[float, int]] = []

    async def scenario() -> tuple[list[Any], float]:
        stop = asyncio.Event()
        load = asyncio.create_task(
            run_load(
                service.url,
                lambda i: ("inline", {"query": {"gender": "FM"[i % 2]}, "k": 20}),
                clients=6,
                stop=stop,
                keepalive=False,  # a refused connection is never an admitted request
            )
        )

        async def poll_ready() -> None:
            async with httpx.AsyncClient(base_url=service.url, timeout=2) as client:
                while not stop.is_set():
                    sent = time.monotonic()
                    try:
                        code = (await client.get("/readyz")).status_code
                    except httpx.HTTPError:
                        code = 0
                    readiness.append((sent, code))  # by send time: after the signal
                    await asyncio.sleep(0.02)

        poller = asyncio.create_task(poll_ready())
        await asyncio.sleep(1.0)  # steady load first
        signalled = time.monotonic()
        service.process.send_signal(signal.SIGTERM)
        while service.process.poll() is None and time.monotonic() - signalled < grace_s + 5:
            await asyncio.sleep(0.02)
        stop.set()
        await poller
        return await load, signalled

    try:
        outcomes, signalled = asyncio.run(scenario())
        exited = time.monotonic() - signalled
        # uvicorn re-raises the signal once its graceful shutdown is done: -SIGTERM is a
        # clean exit here, which the lifespan's last log line confirms
        assert service.process.wait(timeout=15) in (0, -signal.SIGTERM)
    finally:
        service.kill()
    assert "service stopped" in (tmp_path / "serve.log").read_text()
    assert exited < drain_s + grace_s + 2
    answered = [o for o in outcomes if o.status]
    assert len(answered) > 50 and all(o.status == 200 for o in answered), {
        o.status for o in answered
    }
    # no HTTP answer only for connections opened once the drain was over and the listening
    # socket closing (refused, or reset in the accept backlog): never a request in flight
    # or one sent while draining (a balancer following /readyz sends none by then)
    unanswered = [o for o in outcomes if not o.status]
    assert all(o.sent >= signalled + drain_s - 0.05 for o in unanswered)
    assert {o.error for o in unanswered} <= {"ConnectError", "ReadError", "RemoteProtocolError"}
    assert any(o.sent > signalled for o in answered)  # served while draining
    after = [code for at, code in readiness if at > signalled]
    assert after and after[0] in (503, 0) and 200 not in after  # readiness flipped first
    assert 503 in after
