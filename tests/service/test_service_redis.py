"""Redis: the feature store pushed by `retrieval features push`, the response cache, index
announcements, and a Redis that dies mid-test (a private redis-server, killed and restarted)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import cast

import httpx
import pytest
import redis
from service_fixtures import (
    RedisProcess,
    free_port,
    live_server,
    push,
    set_current,
    wait_until,
    write_subset_version,
)

from index.publish import announce_version
from retrieval.cli import main as retrieval_main
from retrieval.index_store import PUBLISH_CHANNEL, read_current
from service.feature_store import META_KEY
from service.settings import ServiceSettings

pytestmark = pytest.mark.redis

REDIS_URL_ENV, REDIS_URL_FILE_ENV = "RETRIEVAL_REDIS_URL", "RETRIEVAL_REDIS_URL_FILE"


def test_features_push_cli_writes_records_and_meta(
    shared_redis: tuple[str, str], tiny_dataset: Path, tiny_bundle: Path
) -> None:
    url, prefix = shared_redis
    argv = ["features", "push", "--data", str(tiny_dataset), "--redis-url", url]
    assert retrieval_main([*argv, "--model", str(tiny_bundle), "--prefix", prefix]) == 0
    client = redis.Redis.from_url(url, socket_timeout=2)
    meta = json.loads(cast(bytes, client.get(f"{prefix}{META_KEY}")))
    assert meta["users"] == 48 and meta["context_splits"] == ["train", "valid"]
    assert meta["history_length"] == 8  # the bundle's (trained with history_length 8)
    record = json.loads(cast(bytes, client.get(f"{prefix}user:u000")))
    assert set(record) == {"features", "history", "seen"}
    assert record["features"]["user_id"] == "u000" and len(record["history"]) <= 8
    client.close()


def test_redis_feature_store_and_cache(
    make_settings: Callable[..., ServiceSettings],
    shared_redis: tuple[str, str],
    tiny_dataset: Path,
    tiny_bundle: Path,
) -> None:
    url, prefix = shared_redis
    push(url, tiny_dataset, tiny_bundle, prefix)
    body = {"user_id": "u007", "k": 30, "exclude_seen": True}
    # the embedded store (from --data) gives the reference answer
    with live_server(make_settings(port=free_port())) as embedded:
        reference = httpx.post(f"{embedded.url}/v1/retrieve", json=body).json()
    settings = make_settings(port=free_port(), redis_url=url, redis_prefix=prefix, data_dir=None)
    with live_server(settings) as server:
        first = httpx.post(f"{server.url}/v1/retrieve", json=body).json()
        assert first["ids"] == reference["ids"] and first["cached"] is False
        server.app.state.services.cache  # noqa: B018  (exists)
        assert wait_until(lambda: not server.services.cache._writes, 5)
        second = httpx.post(f"{server.url}/v1/retrieve", json=body).json()
        assert second["cached"] is True and second["ids"] == first["ids"]
        assert second["index_version"] == first["index_version"]
        inline = {"query": {"gender": "M"}, "k": 10}
        assert httpx.post(f"{server.url}/v1/retrieve", json=inline).json()["cached"] is False
        missing = httpx.post(f"{server.url}/v1/retrieve", json={"user_id": "ghost"})
        assert missing.status_code == 404
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'retrieval_cache_requests_total{result="hit"} 1.0' in metrics
        assert "retrieval_redis_up 1.0" in metrics
        info = httpx.get(f"{server.url}/v1/info").json()
        assert info["feature_store"] == "redis" and info["cache"] is True


def test_redis_down_then_back(
    make_settings: Callable[..., ServiceSettings], tiny_dataset: Path, tiny_bundle: Path
) -> None:
    private = RedisProcess().start()
    try:
        prefix = "svc-test:"
        push(private.url, tiny_dataset, tiny_bundle, prefix)
        settings = make_settings(
            port=free_port(),
            redis_url=private.url,
            redis_prefix=prefix,
            data_dir=None,
            redis_down_backoff_s=0.2,
        )
        user = {"user_id": "u010", "k": 10, "exclude_seen": True}
        inline = {"query": {"gender": "F"}, "k": 10}
        with live_server(settings) as server:
            assert httpx.post(f"{server.url}/v1/retrieve", json=user).status_code == 200
            private.kill()
            for _ in range(3):  # first call finds it dead, the next ones skip it (backing off)
                ok = httpx.post(f"{server.url}/v1/retrieve", json=inline, timeout=5)
                assert ok.status_code == 200 and len(ok.json()["ids"]) == 10
                assert ok.elapsed.total_seconds() < 1.0  # short timeouts: bounded added latency
                down = httpx.post(f"{server.url}/v1/retrieve", json=user, timeout=5)
                assert down.status_code == 503 and "retry-after" in down.headers
                error = down.json()["error"]
                assert error["code"] == "dependency_unavailable"
                assert "inline `query` requests still work" in error["message"]
            assert "retrieval_redis_up 0.0" in httpx.get(f"{server.url}/metrics").text
            assert httpx.get(f"{server.url}/readyz").status_code == 200  # inline still served
            private.start()  # same port, empty (no persistence): push again
            push(private.url, tiny_dataset, tiny_bundle, prefix)

            def recovered() -> bool:
                return (
                    httpx.post(f"{server.url}/v1/retrieve", json=user, timeout=5).status_code == 200
                )

            assert wait_until(recovered, 10, interval_s=0.1)
            assert "retrieval_redis_up 1.0" in httpx.get(f"{server.url}/metrics").text
    finally:
        private.kill()


def test_index_announcement_triggers_the_swap(
    make_settings: Callable[..., ServiceSettings], index_copy: Path, tiny_bundle: Path
) -> None:
    private = RedisProcess().start()
    try:
        old = read_current(index_copy)
        settings = make_settings(
            port=free_port(),
            index_root=index_copy,
            redis_url=private.url,
            index_poll_s=3600,  # polling is off for this test: only the message can swap
        )
        with live_server(settings) as server:
            assert wait_until(lambda: _subscribers(private.url) >= 1, 10)
            new = write_subset_version(index_copy, "v2-announced", tiny_bundle)
            set_current(index_copy, new)
            assert server.services.index_manager.current.version == old
            assert announce_version(private.url, new) == 1
            assert wait_until(lambda: server.services.index_manager.current.version == new, 10)
            answer = httpx.post(f"{server.url}/v1/retrieve", json={"query": {}, "k": 3}).json()
            assert answer["index_version"] == new
    finally:
        private.kill()


def _subscribers(url: str) -> int:
    client = redis.Redis.from_url(url, socket_timeout=1)
    try:
        counts = client.pubsub_numsub("retrieval:index:published")
        return int(counts[0][1]) if counts else 0
    finally:
        client.close()


def test_the_jobs_read_the_redis_url_from_the_environment_or_a_file(
    tiny_dataset: Path,
    tiny_bundle: Path,
    index_copy: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`features push`, `index rollback` and `build-index` take the URL (password and all)
    from RETRIEVAL_REDIS_URL, RETRIEVAL_REDIS_URL_FILE or --redis-url-file, so it need not
    be on a command line; with none of them, `features push` says what to set."""
    password = "job-secret-0123456789"
    private = RedisProcess(password=password).start()
    url_file = tmp_path / "redis_url"
    url_file.write_text(private.url + "\n")
    for name in (REDIS_URL_ENV, REDIS_URL_FILE_ENV):
        monkeypatch.delenv(name, raising=False)
    client = redis.Redis.from_url(private.url, socket_timeout=2)
    pubsub = client.pubsub()
    try:
        push_argv = ["features", "push", "--data", str(tiny_dataset), "--model", str(tiny_bundle)]
        ways: dict[str, tuple[dict[str, str], list[str]]] = {
            "env": ({REDIS_URL_ENV: private.url}, []),
            "env-file": ({REDIS_URL_FILE_ENV: str(url_file)}, []),
            "flag-file": ({}, ["--redis-url-file", str(url_file)]),
            # a flag wins over the variables (here a URL that would be refused)
            "flag-over-env": (
                {REDIS_URL_ENV: "redis://127.0.0.1:1/0"},
                ["--redis-url-file", str(url_file)],
            ),
        }
        for way, (env, flags) in ways.items():
            with monkeypatch.context() as patch:
                for name, value in env.items():
                    patch.setenv(name, value)
                assert retrieval_main([*push_argv, "--prefix", f"job-{way}:", *flags]) == 0, way
            assert client.get(f"job-{way}:{META_KEY}") is not None, way
        assert retrieval_main(push_argv) == 2
        assert "no Redis URL: set RETRIEVAL_REDIS_URL" in capsys.readouterr().err

        pubsub.subscribe(PUBLISH_CHANNEL)
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
        monkeypatch.setenv(REDIS_URL_FILE_ENV, str(url_file))
        old = read_current(index_copy)
        set_current(index_copy, write_subset_version(index_copy, "v2-env", tiny_bundle))
        assert retrieval_main(["index", "rollback", "--root", str(index_copy)]) == 0
        assert _next_announcement(pubsub) == old
        monkeypatch.delenv(REDIS_URL_FILE_ENV)
        monkeypatch.setenv(REDIS_URL_ENV, private.url)
        root = tmp_path / "built"
        build = ["build-index", "--model", str(tiny_bundle), "--data", str(tiny_dataset)]
        build += ["--out", str(root), "--factory", "Flat", "--recall-queries", "64"]
        assert retrieval_main([*build, "--no-progress", "--threads", "1"]) == 0
        assert _next_announcement(pubsub) == read_current(root)
        printed = capsys.readouterr()
        assert password not in printed.out + printed.err
    finally:
        pubsub.close()
        client.close()
        private.kill()


def _next_announcement(pubsub: redis.client.PubSub) -> str | None:
    message = pubsub.get_message(ignore_subscribe_messages=True, timeout=10)
    return None if message is None else message["data"].decode()
