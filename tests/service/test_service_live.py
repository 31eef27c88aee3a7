"""The real service under a real uvicorn on loopback, driven by a real HTTP client:
overload (429 + Retry-After), deadline (504), hot swap under load, failed swap, graceful
shutdown."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from service_fixtures import (
    corrupt_copy,
    free_port,
    ids_by_version,
    live_server,
    set_current,
    slow_embed,
    wait_until,
    write_subset_version,
)

from retrieval.index_store import read_current
from service.settings import ServiceSettings

QUERIES: list[dict[str, Any]] = [
    {"gender": "F", "history": ["m 001/x"]},
    {"gender": "M", "occupation": "artist", "history": ["m 004/x", "m 010/x"]},
    {"age_bucket": "35-44", "zip_prefix": "30"},
    {},
]


async def post_many(url: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        return list(await asyncio.gather(*(client.post("/v1/retrieve", json=b) for b in bodies)))


def test_overload_answers_429_with_retry_after(
    make_settings: Callable[..., ServiceSettings],
) -> None:
    settings = make_settings(port=free_port(), max_in_flight=2, retry_after_s=3, max_wait_ms=0)
    with live_server(settings) as server:
        undo = slow_embed(server.services, 0.3)
        responses = asyncio.run(post_many(server.url, [{"query": {}, "k": 5}] * 6))
        undo()
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 2 and codes.count(429) >= 1 and set(codes) <= {200, 429}
        for response in responses:
            if response.status_code == 429:
                assert response.headers["retry-after"] == "3"
                assert response.json()["error"]["code"] == "overloaded"
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'retrieval_rejected_total{reason="overload"}' in metrics
        # once the load is gone, requests are admitted again
        assert (
            httpx.post(f"{server.url}/v1/retrieve", json={"query": {}, "k": 5}).status_code == 200
        )


def test_deadline_answers_504(make_settings: Callable[..., ServiceSettings]) -> None:
    settings = make_settings(port=free_port(), request_timeout_s=0.2)
    with live_server(settings) as server:
        undo = slow_embed(server.services, 0.6)
        started = time.perf_counter()
        late = httpx.post(f"{server.url}/v1/retrieve", json={"query": {}, "k": 5}, timeout=10)
        elapsed = time.perf_counter() - started
        undo()
        assert late.status_code == 504 and elapsed < 0.55
        assert late.json()["error"] == {
            "code": "deadline_exceeded",
            "message": "the request did not finish within 0.2 s",
        }
        assert wait_until(lambda: server.services.batcher.in_batch == 0, 5)
        on_time = httpx.post(f"{server.url}/v1/retrieve", json={"query": {}, "k": 5}, timeout=10)
        assert on_time.status_code == 200
        assert (
            'retrieval_rejected_total{reason="timeout"} 1.0'
            in httpx.get(f"{server.url}/metrics").text
        )


async def load_loop(
    url: str, stop: asyncio.Event, concurrency: int, answers: list[tuple[int, dict[str, Any]]]
) -> None:
    """`concurrency` clients posting QUERIES round robin until `stop` is set."""

    async def client_loop(offset: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            i = offset
            while not stop.is_set():
                q = i % len(QUERIES)
                response = await client.post("/v1/retrieve", json={"query": QUERIES[q], "k": 20})
                body = response.json()
                body["_query"] = q
                answers.append((response.status_code, body))
                i += 1

    await asyncio.gather(*(client_loop(c) for c in range(concurrency)))


async def until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def test_hot_swap_under_load(
    make_settings: Callable[..., ServiceSettings], index_copy: Path, tiny_bundle: Path
) -> None:
    old = read_current(index_copy)
    new = write_subset_version(index_copy, "v2-half-catalog", tiny_bundle)
    expected = ids_by_version(tiny_bundle, index_copy, [old, new], 20, QUERIES)
    assert expected[old] != expected[new]  # the versions give different answers
    settings = make_settings(port=free_port(), index_root=index_copy, index_poll_s=0.05)
    with live_server(settings) as server:
        undo = slow_embed(server.services, 0.01)  # batches in flight while the swap happens

        async def scenario() -> list[tuple[int, dict[str, Any]]]:
            answers: list[tuple[int, dict[str, Any]]] = []
            stop = asyncio.Event()
            load = asyncio.create_task(load_loop(server.url, stop, 4, answers))
            await until(lambda: len(answers) >= 20)  # traffic flows on the old version
            set_current(index_copy, new)
            swapped = len(answers)
            await until(lambda: any(b["index_version"] == new for _, b in answers[swapped:]))
            settled = len(answers)
            await until(lambda: len(answers) >= settled + 20)  # and keeps flowing on the new
            stop.set()
            await load
            return answers

        answers = asyncio.run(scenario())
        undo()
    assert answers and all(code == 200 for code, _ in answers)
    versions = [body["index_version"] for _, body in answers]
    assert set(versions) == {old, new}
    for _, body in answers:  # every answer is exactly what its named version gives
        assert body["ids"] == expected[body["index_version"]][body["_query"]]
    assert versions[-1] == new


def test_failed_swap_keeps_serving(
    make_settings: Callable[..., ServiceSettings], index_copy: Path, tiny_bundle: Path
) -> None:
    old = read_current(index_copy)
    bad = corrupt_copy(index_copy, old, "v3-corrupt")
    settings = make_settings(port=free_port(), index_root=index_copy, index_poll_s=0.05)
    with live_server(settings) as server:
        set_current(index_copy, bad)
        assert wait_until(lambda: server.services.index_manager.swaps_failed >= 1, 10)
        response = httpx.post(f"{server.url}/v1/retrieve", json={"query": {}, "k": 5})
        assert response.status_code == 200 and response.json()["index_version"] == old
        info = httpx.get(f"{server.url}/v1/info").json()
        assert info["index"]["version"] == old
        assert "checksum mismatch" in info["index_swaps"]["last_error"]
        time.sleep(0.3)  # the watcher does not retry the same bad version in a loop
        assert server.services.index_manager.swaps_failed == 1
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'retrieval_index_swaps_total{result="failed"} 1.0' in metrics
        assert f'retrieval_index_version_info{{version="{old}"}} 1.0' in metrics
        assert httpx.get(f"{server.url}/readyz").status_code == 200
        # a good version published later is picked up
        good = write_subset_version(index_copy, "v4-good", tiny_bundle, keep_every=3, source=old)
        set_current(index_copy, good)
        assert wait_until(
            lambda: (
                httpx.post(f"{server.url}/v1/retrieve", json={"query": {}, "k": 5}).json()[
                    "index_version"
                ]
                == good
            ),
            10,
        )


def test_graceful_shutdown_drains_in_flight_requests(
    make_settings: Callable[..., ServiceSettings],
) -> None:
    # the in-flight request outlasts the drain, so it finishes after the listener closed;
    # the drain is long enough for the readiness probe's new connection on a slow machine
    settings = make_settings(port=free_port(), shutdown_drain_s=1.0, max_wait_ms=0)
    with live_server(settings) as server:
        slow_embed(server.services, 1.5)

        async def scenario() -> tuple[httpx.Response, int]:
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
                pending = asyncio.create_task(
                    client.post("/v1/retrieve", json={"query": {}, "k": 5})
                )
                await asyncio.sleep(0.1)  # the request is in its batch
                server.server.handle_exit(signal.SIGTERM, None)  # what SIGTERM does
                ready = await client.get("/readyz")
                return await pending, ready.status_code

        in_flight, ready_status = asyncio.run(scenario())
        assert ready_status == 503  # readiness flips first
        assert in_flight.status_code == 200 and len(in_flight.json()["ids"]) == 5
        assert wait_until(lambda: not server.thread.is_alive(), 15)
