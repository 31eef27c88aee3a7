"""Rows 1-3 of the reliability suite: bad API keys, bad request values and oversized
bodies against the real service on loopback; none of them reaches the index."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from reliability_fixtures import SearchSpy, rss_bytes
from service_fixtures import live_server, make_dense_artifacts

from service.settings import ServiceSettings

KEY = "s3cret-key-0123456789"


def test_row1_bad_api_keys_get_one_401_that_leaks_nothing(
    make_settings: Callable[..., ServiceSettings],
) -> None:
    settings = make_settings(api_key=SecretStr(KEY))
    attempts: list[dict[str, str]] = [
        {},
        {"X-API-Key": ""},
        {"X-API-Key": "x" * len(KEY)},  # right length, wrong bytes
        {"X-API-Key": KEY[:-1]},  # a prefix
        {"X-API-Key": KEY + "x"},  # an extension
        {"X-API-Key": KEY.upper()},
        {"Authorization": f"Bearer {KEY}"},  # the right key in the wrong header
    ]
    calls = [
        ("POST", "/v1/retrieve", {"query": {}, "k": 3}),
        ("POST", "/v1/retrieve/batch", {"queries": [{"query": {}, "k": 3}]}),
        ("GET", "/v1/info", None),
        ("POST", "/v1/retrieve", {"query": {"no_such_feature": 1}}),  # 401 before 422
    ]
    with live_server(settings) as server:
        spy = SearchSpy(server.services)
        bodies = set()
        for headers in attempts:
            for method, path, body in calls:
                response = httpx.request(
                    method, f"{server.url}{path}", json=body, headers=headers, timeout=5
                )
                assert response.status_code == 401, (headers, path)
                assert response.json() == {
                    "error": {"code": "unauthorized", "message": "missing or invalid API key"}
                }
                sent = "".join(headers.values())
                assert KEY not in response.text and (not sent or sent not in response.text)
                assert "server" not in response.headers  # no version banner either
                bodies.add(response.content)
        assert len(bodies) == 1  # missing, wrong and near-miss keys are indistinguishable
        assert spy.calls == 0  # nothing reached the index
        ok = httpx.post(
            f"{server.url}/v1/retrieve", json={"query": {}, "k": 3}, headers={"X-API-Key": KEY}
        )
        assert ok.status_code == 200 and spy.calls == 1


RAW = {"content-type": "application/json"}
BAD_BODIES: list[tuple[bytes, str]] = [
    (b'{"query": {}, "k": 0}', "k"),
    (b'{"query": {}, "k": -5}', "k"),
    (b'{"query": {}, "k": 2049}', "k"),
    (b'{"query": {}, "k": 2.5}', "k"),
    (b'{"query": {}, "k": "10"}', "k"),
    (b'{"query": {}, "k": true}', "k"),
    (b'{"query": {}, "k": [10]}', "k"),
    (b'{"query": {"colour": "red"}}', "query.colour"),
    (b'{"query": {"country": ["fr"]}}', "query.country"),
    (b'{"query": {"country": {"a": 1}}}', "query.country"),
    (b'{"query": {"age": "31"}}', "query.age"),
    (b'{"query": {"age": NaN}}', "query.age"),
    (b'{"query": {"age": Infinity}}', "query.age"),
    (b'{"query": {"age": -Infinity}}', "query.age"),
    (b'{"query": {"age": 1' + b"0" * 400 + b"}}", "query.age"),  # beyond the float range
    (b'{"query": {"history": "i3"}}', "query.history"),
    (b'{"query": {"history": ["i1", "i2", "i3", "i4", "i5", null]}}', "query.history"),
    (b'{"query": {}, "exclude_ids": [3]}', "exclude_ids.0"),
    (b'{"query": {}, "exclude_seen": "yes"}', "exclude_seen"),
    (b'{"query": {}, "colour": "red"}', "colour"),
    (b'{"queries": [{"query": {}}, {"query": {"age": NaN}}]}', "queries[1].query.age"),
    (b'{"queries": [{"query": {}, "k": 0}]}', "queries[0].k"),
]


def test_row2_bad_values_are_422_naming_the_field_and_never_reach_the_index(
    tmp_path: Path,
) -> None:
    from service_fixtures import free_port

    bundle, index = make_dense_artifacts(tmp_path)
    settings = ServiceSettings(model_dir=bundle, index_root=index, port=free_port())
    with live_server(settings) as server:
        spy = SearchSpy(server.services)
        batches = len(server.services.batcher.batch_sizes)
        for body, field in BAD_BODIES:
            path = "/v1/retrieve/batch" if body.startswith(b'{"queries"') else "/v1/retrieve"
            response = httpx.post(f"{server.url}{path}", content=body, headers=RAW, timeout=5)
            assert response.status_code == 422, body
            error = response.json()["error"]
            assert error["code"] == "invalid_request" and error["field"] == field, (body, error)
            assert "Traceback" not in response.text
        assert spy.calls == 0 and len(server.services.batcher.batch_sizes) == batches
        # the same request with good values is searched (the spy does count)
        good = {"query": {"country": "fr", "age": 31.0, "history": ["i3"]}, "k": 5}
        assert httpx.post(f"{server.url}/v1/retrieve", json=good).status_code == 200
        assert spy.calls == 1


def send_oversized(port: int, head: bytes, body_chunks: Any, cap_bytes: int) -> tuple[int, int]:
    """Send `head`, then body chunks (until the server answers, refuses more, or `cap_bytes`);
    returns (HTTP status of the answer, body bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sent = 0
    done = threading.Event()

    def pump() -> None:
        nonlocal sent
        try:
            sock.sendall(head)
            for chunk in body_chunks:
                if done.is_set() or sent >= cap_bytes:
                    return
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            return  # the server closed the connection after its 413

    sender = threading.Thread(target=pump, daemon=True)
    sender.start()
    try:
        answer = b""
        while b"\r\n" not in answer:
            data = sock.recv(4096)
            if not data:
                break
            answer += data
    finally:
        done.set()
        sock.close()
        sender.join(timeout=10)
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    return status, sent


def test_row3_oversized_bodies_get_413_before_parsing_with_flat_memory(
    make_settings: Callable[..., ServiceSettings],
) -> None:
    limit = 64 * 1024
    settings = make_settings(max_body_bytes=limit)
    chunk = b"x" * 65536  # not JSON: a parser would answer 422, the limit answers 413

    def chunked() -> Any:
        while True:
            yield b"%x\r\n" % len(chunk) + chunk + b"\r\n"

    with live_server(settings) as server:
        spy = SearchSpy(server.services)
        port = settings.port
        # declared too large: refused from the headers, without reading any body
        head = (
            f"POST /v1/retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {1 << 30}\r\n\r\n"
        ).encode()
        started = time.monotonic()
        status, _ = send_oversized(port, head, iter(()), 0)
        assert status == 413 and time.monotonic() - started < 2.0
        # chunked, no length: cut off once past the limit, long before the 64 MiB cap
        head_chunked = (
            b"POST /v1/retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        send_oversized(port, head_chunked, chunked(), 64 << 20)  # warm-up
        before = rss_bytes()
        sent_bytes = []
        for _ in range(20):
            status, sent = send_oversized(port, head_chunked, chunked(), 64 << 20)
            assert status == 413
            sent_bytes.append(sent)
        growth = rss_bytes() - before
        # 20 x (up to 64 MiB offered): the server holds at most `limit` per request
        assert growth < 16 << 20, f"RSS grew {growth / 2**20:.1f} MiB"
        assert max(sent_bytes) < 64 << 20  # the server stopped reading: the cap was never hit
        assert spy.calls == 0
        metrics = httpx.get(f"{server.url}/metrics").text
        # counted (route "other": refused before routing): 1 declared + 1 warm-up + 20
        assert 'requests_total{method="POST",route="other",status="413"} 22.0' in metrics
        ok = httpx.post(f"{server.url}/v1/retrieve", json={"query": {}, "k": 2})
        assert ok.status_code == 200  # the service is unharmed


@pytest.mark.parametrize("limit", [1024])
def test_row3_a_body_at_the_limit_is_served(
    make_settings: Callable[..., ServiceSettings], limit: int
) -> None:
    body = json.dumps({"query": {}, "k": 2, "exclude_ids": []}).encode()
    padded = body[:-1] + b" " * (limit - len(body)) + b"}"  # exactly `limit` bytes
    assert len(padded) == limit
    with live_server(make_settings(max_body_bytes=limit)) as server:
        response = httpx.post(f"{server.url}/v1/retrieve", content=padded, headers=RAW)
        assert response.status_code == 200
        over = httpx.post(f"{server.url}/v1/retrieve", content=padded + b" ", headers=RAW)
        assert over.status_code == 413
