"""Row 7 of the reliability suite (short form): Redis SIGKILLed under load, then restarted.

A private redis-server (killable without touching the shared one) holds the pushed
features; inline and `user_id` clients run throughout. `make soak` runs the long form and
row 8 (SIGSTOP / SIGCONT).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from reliability_fixtures import run_load
from service_fixtures import RedisProcess, live_server, push

from service.settings import ServiceSettings

pytestmark = pytest.mark.redis


def test_row7_short_redis_killed_mid_load_then_restarted(
    make_settings: Callable[..., ServiceSettings], tiny_dataset: Path, tiny_bundle: Path
) -> None:
    # (sequential requests around a kill: tests/service/test_service_redis.py::test_redis_down_then_back)
    private = RedisProcess().start()
    prefix = "rel-redis:"
    timeout_s = 1.0
    try:
        push(private.url, tiny_dataset, tiny_bundle, prefix)
        settings = make_settings(
            redis_url=private.url,
            redis_prefix=prefix,
            data_dir=None,
            request_timeout_s=timeout_s,
            redis_down_backoff_s=0.2,
        )

        def body(i: int) -> tuple[str, dict[str, object]]:
            if i % 2:
                return "user", {"user_id": f"u{i % 48:03d}", "k": 10, "exclude_seen": True}
            return "inline", {"query": {"gender": "FM"[i % 4 // 2]}, "k": 10}

        with live_server(settings) as server:

            async def scenario() -> tuple[list, float, float, float]:
                stop = asyncio.Event()
                load = asyncio.create_task(run_load(server.url, body, clients=4, stop=stop))
                await asyncio.sleep(1.0)
                killed = time.monotonic()
                await asyncio.to_thread(private.kill)  # SIGKILL mid-load
                await asyncio.sleep(1.5)
                restarted = time.monotonic()
                await asyncio.to_thread(private.start)  # same port, empty: push again
                await asyncio.to_thread(push, private.url, tiny_dataset, tiny_bundle, prefix)
                pushed = time.monotonic()
                await asyncio.sleep(2.0)
                stop.set()
                return await load, killed, restarted, pushed

            outcomes, killed, restarted, pushed = asyncio.run(scenario())
    finally:
        private.kill()

    assert len(outcomes) > 100
    # no 500; a 404 only while the restarted (empty, no persistence) Redis awaits its push
    refilling = [o for o in outcomes if o.status == 404]
    assert all(
        o.kind == "user" and o.sent <= pushed and o.sent + o.seconds >= restarted for o in refilling
    )
    assert all(o.status in (200, 503, 404) for o in outcomes), {o.status for o in outcomes}
    inline = [o for o in outcomes if o.kind == "inline"]
    assert all(o.status == 200 for o in inline)  # inline features never need Redis
    users = [o for o in outcomes if o.kind == "user"]
    down = [o for o in users if killed + 0.3 < o.sent and o.sent + o.seconds < restarted]
    assert down and all(o.status == 503 for o in down)  # user_id: 503 while Redis is dead
    for o in (o for o in users if o.status == 503):
        assert o.body["error"]["code"] == "dependency_unavailable"
    # recovery within 10 s of the restart (features pushed again right after it)
    recovered = [o.sent + o.seconds for o in users if o.status == 200 and o.sent > pushed]
    assert recovered and min(recovered) - restarted < 10.0
    assert all(o.status == 200 for o in users if o.sent > pushed + 2 * 0.2)
    # latency bounded by the configured timeouts, Redis down or not
    assert max(o.seconds for o in outcomes) < timeout_s


def test_row7_more_lookups_than_pool_connections_is_not_an_outage(
    make_settings: Callable[..., ServiceSettings], tiny_dataset: Path, tiny_bundle: Path
) -> None:
    """Found by the soak: with more concurrent `user_id` lookups than pooled connections the
    pool raised MaxConnectionsError, which marked a healthy Redis down (1 s of 503s)."""
    private = RedisProcess().start()
    prefix = "rel-pool:"
    try:
        push(private.url, tiny_dataset, tiny_bundle, prefix)
        settings = make_settings(
            redis_url=private.url,
            redis_prefix=prefix,
            data_dir=None,
            redis_max_connections=2,
            cache_enabled=False,
        )
        with live_server(settings) as server:

            async def burst() -> list[int]:
                async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
                    answers = await asyncio.gather(
                        *(
                            client.post("/v1/retrieve", json={"user_id": f"u{i:03d}", "k": 5})
                            for i in range(48)
                        )
                    )
                return [a.status_code for a in answers]

            codes = [code for _ in range(3) for code in asyncio.run(burst())]
            assert codes == [200] * len(codes)
            assert server.services.redis.last_error is None  # never marked down
            assert "retrieval_redis_up 1.0" in httpx.get(f"{server.url}/metrics").text
    finally:
        private.kill()
