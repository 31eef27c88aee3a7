"""Redis rows of the reliability suite.

Row 7 (short form): Redis SIGKILLed under load, then restarted. A private redis-server
(killable without touching the shared one) holds the pushed features; inline and
`user_id` clients run throughout. `make soak` runs the long form and row 8 (SIGSTOP /
SIGCONT).

Row 26: the Redis password (in the URL) is in no log line of `retrieval serve`, not in
/v1/info and not on its command line (the compose files: tests/docker).

Row 27: a Redis that refuses writes (OOM, READONLY) but serves reads: cache writes are
dropped, `user_id` lookups keep answering and the link stays up.

Row 28: garbage in Redis (user records that are not JSON or have the wrong shape or
values, a key of another type, an unreadable push meta key): a 500 naming the key, or a
warning at start, never a 422 blaming the client or a service that does not start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from reliability_fixtures import ServeProcess, run_load
from service_fixtures import (
    SHARED_REDIS_URL,
    RedisProcess,
    free_port,
    live_server,
    push,
    shared_redis_prefix,
    wait_until,
)

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


# --------------------------------------------------------------------------- row 27


@pytest.mark.parametrize("refusal", ["oom", "readonly"])
def test_row27_refused_cache_writes_keep_user_lookups_answering(
    make_settings: Callable[..., ServiceSettings],
    tiny_dataset: Path,
    tiny_bundle: Path,
    refusal: str,
) -> None:
    """A Redis that refuses writes (OOM at `maxmemory` under `noeviction`, or READONLY as a
    replica) still serves reads: the cache writes fail, `user_id` lookups keep answering 200
    and the link is never marked down (which would turn every `user_id` lookup into a 503)."""
    private = RedisProcess().start()
    prefix = "rel-refused:"
    admin = redis.Redis.from_url(private.url, socket_timeout=2, socket_connect_timeout=2)
    try:
        push(private.url, tiny_dataset, tiny_bundle, prefix)
        settings = make_settings(
            redis_url=private.url, redis_prefix=prefix, data_dir=None, redis_down_backoff_s=5.0
        )
        with live_server(settings) as server:
            if refusal == "oom":  # every write is now over the memory cap
                admin.config_set("maxmemory-policy", "noeviction")
                admin.config_set("maxmemory", 1)
            else:  # a replica of a master that is not there keeps serving its data
                admin.replicaof("127.0.0.1", str(free_port()))
            with pytest.raises(redis.ResponseError):
                admin.set(f"{prefix}probe", "x")  # writes really are refused
            codes = []
            with httpx.Client(base_url=server.url, timeout=10) as client:
                for i in range(24):  # each a cache miss, each followed by a refused write
                    answer = client.post("/v1/retrieve", json={"user_id": f"u{i:03d}", "k": 5})
                    codes.append(answer.status_code)
                    assert wait_until(lambda: not server.services.cache._writes)  # write done
                metrics = client.get("/metrics").text
                info = client.get("/v1/info").json()["redis"]
        assert codes == [200] * 24
        assert info["last_error"] is None and info["backing_off"] is False  # never marked down
        assert info["reply_errors"] >= 24
        expected = "OutOfMemoryError" if refusal == "oom" else "ReadOnlyError"
        assert info["last_reply_error"].startswith(expected)
        assert "retrieval_redis_up 1.0" in metrics
        errors = [
            line for line in metrics.splitlines() if 'cache_requests_total{result="error"}' in line
        ]
        assert errors and float(errors[0].split()[-1]) >= 24  # every dropped write counted
    finally:
        admin.close()
        private.kill()


# --------------------------------------------------------------------------- row 28


@pytest.fixture
def shared_prefix() -> Iterator[tuple[redis.Redis, str]]:
    """(client, unique key prefix) on the shared Redis; the prefix's keys are deleted after."""
    with shared_redis_prefix("rel-garbage") as shared:
        yield shared


GOOD = {"features": {"gender": "F"}, "history": [], "seen": []}
GARBAGE: dict[str, Any] = {  # user -> what their key holds instead of a record
    "u000": "not json {",
    "u001": ["a", "list"],
    "u002": {**GOOD, "features": ["F"]},  # features a list
    "u003": {**GOOD, "history": "m 001/x"},  # history a string
    "u004": {**GOOD, "seen": None},  # seen null
    "u005": {**GOOD, "history": [7]},  # an id that is not a string
    "u006": {"features": {}, "history": []},  # seen missing
    "u007": {**GOOD, "features": {"gender": {"nested": 1}}},  # a value the checks refuse
    "u008": {**GOOD, "features": {"no_such_feature": "x"}},  # a feature the model lacks
    "u009": {**GOOD, "history": ["m 001/x", None]},  # a null history id
}


@pytest.mark.parametrize("fast_path", [True, False])
def test_row28_garbage_user_records_are_a_server_fault_naming_the_key(
    make_settings: Callable[..., ServiceSettings],
    tiny_dataset: Path,
    tiny_bundle: Path,
    shared_prefix: tuple[redis.Redis, str],
    caplog: pytest.LogCaptureFixture,
    fast_path: bool,
) -> None:
    """Records that are not what `features push` writes answer 500 `feature_store_corrupt`
    naming the key (never a 422 blaming the client, never a traceback), each key logged
    once; the other users, and Redis, keep working."""
    client, prefix = shared_prefix
    push(SHARED_REDIS_URL, tiny_dataset, tiny_bundle, prefix)
    for user, value in GARBAGE.items():
        client.set(f"{prefix}user:{user}", value if isinstance(value, str) else json.dumps(value))
    client.delete(f"{prefix}user:u010")
    client.hset(f"{prefix}user:u010", "features", "{}")  # another Redis type
    settings = make_settings(
        redis_url=SHARED_REDIS_URL, redis_prefix=prefix, data_dir=None, fast_path=fast_path
    )
    caplog.set_level(logging.INFO)
    with live_server(settings) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        for user in [*GARBAGE, "u010"]:
            key = f"{prefix}user:{user}"
            for body in (
                {"user_id": user, "k": 5},
                {"query": {"gender": "M"}, "user_id": user, "exclude_seen": True, "k": 5},
            ):
                answer = http.post("/v1/retrieve", json=body)
                assert answer.status_code == 500, (user, answer.text)
                error = answer.json()["error"]
                assert error["code"] == "feature_store_corrupt", (user, error)
                assert repr(key) in error["message"]
                assert "Traceback" not in answer.text and 'File "' not in answer.text
            batch = http.post("/v1/retrieve/batch", json={"queries": [{"user_id": user}]})
            assert batch.status_code == 500 and batch.json()["error"]["code"] == (
                "feature_store_corrupt"
            )
        good = http.post("/v1/retrieve", json={"user_id": "u011", "k": 5, "exclude_seen": True})
        assert good.status_code == 200  # the link is up: the garbage failed its requests only
        assert server.services.redis.last_error is None
    logged = [r.getMessage() for r in caplog.records if r.name == "service.feature_store"]
    for user in [*GARBAGE, "u010"]:
        key = f"{prefix}user:{user}"
        assert sum(repr(key) in line for line in logged) == 1, (key, logged)  # once per key
    assert not any(r.exc_info for r in caplog.records if r.name.startswith("service"))


@pytest.mark.parametrize(
    "meta", ["not json {", "[1, 2]", '{"history_length": "eight"}', '{"columns": 5}']
)
def test_row28_an_unreadable_push_meta_key_is_a_warning_not_a_failed_start(
    make_settings: Callable[..., ServiceSettings],
    tiny_dataset: Path,
    tiny_bundle: Path,
    shared_prefix: tuple[redis.Redis, str],
    caplog: pytest.LogCaptureFixture,
    meta: str,
) -> None:
    client, prefix = shared_prefix
    push(SHARED_REDIS_URL, tiny_dataset, tiny_bundle, prefix)
    client.set(f"{prefix}features:meta", meta)
    settings = make_settings(redis_url=SHARED_REDIS_URL, redis_prefix=prefix, data_dir=None)
    caplog.set_level(logging.WARNING)
    with live_server(settings) as server:  # it starts (does not exit on the JSON error)
        answer = httpx.post(f"{server.url}/v1/retrieve", json={"user_id": "u001", "k": 5})
        assert answer.status_code == 200
    warned = [r.getMessage() for r in caplog.records if r.name == "service.app"]
    assert any(f"{prefix}features:meta" in line and "cannot be read" in line for line in warned)


# --------------------------------------------------------------------------- row 26


def test_row26_the_redis_password_is_in_no_log_line_and_not_in_info(
    tiny_bundle: Path, tiny_index: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    """`retrieval serve` with a password in its Redis URL (from the environment, as the
    compose file gives it): the password is in no log line (the settings dump at start
    printed it), not in /v1/info and not on the command line."""
    password = f"pw-{uuid.uuid4().hex}"
    private = RedisProcess(password=password).start()
    prefix = "rel-secret:"
    log = tmp_path / "serve.log"
    serve = ServeProcess(
        ["--model", str(tiny_bundle), "--index", str(tiny_index), "--port", str(free_port())],
        env={"RETRIEVAL_REDIS_URL": private.url, "RETRIEVAL_REDIS_PREFIX": prefix},
    )
    try:
        push(private.url, tiny_dataset, tiny_bundle, prefix)
        serve.start(log)
        assert serve.process is not None
        info = httpx.get(f"{serve.url}/v1/info", timeout=10)
        answer = httpx.post(f"{serve.url}/v1/retrieve", json={"user_id": "u001", "k": 5})
        command_line = Path(f"/proc/{serve.process.pid}/cmdline").read_bytes().decode()
        serve.process.terminate()
        serve.process.wait(timeout=30)
    finally:
        serve.kill()
        private.kill()
    assert answer.status_code == 200  # the URL, password included, reached Redis
    assert info.status_code == 200 and info.json()["feature_store"] == "redis"
    text = log.read_text()
    assert "serve: " in text and "service stopped" in text  # the whole life was logged
    assert password not in text
    assert password not in info.text
    assert password not in command_line
