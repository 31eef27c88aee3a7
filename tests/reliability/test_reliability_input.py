"""Rows 1-3 of the reliability suite: bad API keys, bad request values and oversized
bodies against the real service on loopback; none of them reaches the index. Rows 19-21:
one bad query never fails its micro-batch, the over-fetch for exclusions is per query and
the seen set is capped, and the code caches stay bounded."""

from __future__ import annotations

import asyncio
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
from service_fixtures import WAIT_S, LiveServer, free_port, live_server, make_dense_artifacts

from service.feature_store import iter_user_records
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
    # finite as float64, beyond float32 (max 3.4028235e38): the tower would see inf, then NaN
    (b'{"query": {"age": 1e39}}', "query.age"),
    (b'{"query": {"age": -1e39}}', "query.age"),
    (b'{"query": {"age": 3.5e38}}', "query.age"),
    (b'{"query": {"age": %d}}' % 2**128, "query.age"),
    (b'{"queries": [{"query": {}}, {"query": {"age": 1e39}}]}', "queries[1].query.age"),
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


# --------------------------------------------------------------------------- rows 19-21


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def one_batch(server: LiveServer, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    """POST `bodies` to /v1/retrieve so that they run as ONE micro-batch: a first request
    holds the only batch worker (its query tower waits on a gate) while the others queue
    up; the gate opens once all of them are queued. Needs ``batch_workers=1``."""
    services = server.services
    batcher = services.batcher
    assert batcher.workers == 1
    gate = threading.Event()
    original = services.retriever.embed

    def gated(batch: Any) -> Any:
        gate.wait(timeout=WAIT_S)
        return original(batch)

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=WAIT_S) as client:
            blocker = asyncio.ensure_future(client.post("/v1/retrieve", json={"query": {}, "k": 1}))
            await _until(lambda: batcher.in_batch == 1, "the blocking batch")
            sent = [asyncio.ensure_future(client.post("/v1/retrieve", json=b)) for b in bodies]
            await _until(lambda: batcher.queue_depth == len(bodies), "the queued requests")
            services.retriever.embed = original  # the next batches run ungated
            gate.set()
            assert (await blocker).status_code == 200
            return list(await asyncio.gather(*sent))

    services.retriever.embed = gated
    try:
        responses = asyncio.run(run())
    finally:
        gate.set()
        services.retriever.embed = original
    assert batcher.batch_sizes[-1] == len(bodies)  # they did share one batch
    return responses


def record_searches(server: LiveServer) -> list[tuple[int, int]]:
    """(rows, k) of every later search of the serving index version."""
    calls: list[tuple[int, int]] = []
    current = server.services.index_manager.current
    original = current.search

    def search(query_emb: Any, k: int) -> Any:
        calls.append((len(query_emb), k))
        return original(query_emb, k)

    current.search = search
    return calls


def test_row19_a_query_that_poisons_the_tower_fails_alone_in_its_batch(tmp_path: Path) -> None:
    """8 concurrent requests in one micro-batch; one carries an age that passes the checks
    (500,000 train standard deviations out: inside `dense_bounds`) and that the tower is
    made to turn into NaN (the model's own float32 overflow, made certain: the wrapped
    tower poisons every row whose standardised age exceeds 1e5). That one answers 500
    `embedding_failed`; the other 7 answer 200 with the ids they get alone."""
    bundle, index = make_dense_artifacts(tmp_path)
    settings = ServiceSettings(
        model_dir=bundle, index_root=index, port=free_port(), batch_workers=1, request_timeout_s=10
    )
    countries = ["fr", "de", "it"]
    good = [
        {
            "query": {"country": countries[i % 3], "age": 20.0 + 5 * i, "history": [f"i{i}"]},
            "k": 5,
        }
        for i in range(7)
    ]
    with live_server(settings) as server:
        retriever = server.services.retriever
        stats = retriever.encoder.dense_stats("query", "age")
        tower = retriever.embed

        def overflowing_tower(batch: Any) -> Any:
            out = tower(batch).clone()
            out[batch["age"][:, 0] > 1e5] = float("nan")  # what an overflow leaves
            return out

        retriever.embed = overflowing_tower
        bad = {
            "query": {"country": "fr", "age": stats.mean + 5e5 * stats.std, "history": ["i1"]},
            "k": 5,
        }
        bodies = [*good[:3], bad, *good[3:]]
        responses = one_batch(server, bodies)
        statuses = [r.status_code for r in responses]
        assert statuses == [200] * 3 + [500] + [200] * 4, statuses
        error = responses[3].json()["error"]
        assert error["code"] == "embedding_failed" and "non-finite" in error["message"]
        assert "Traceback" not in responses[3].text
        batched = [r.json() for i, r in enumerate(responses) if i != 3]
        for body, answer in zip(good, batched, strict=True):
            alone = httpx.post(f"{server.url}/v1/retrieve", json=body, timeout=WAIT_S)
            assert alone.status_code == 200 and alone.json()["ids"] == answer["ids"], body
        again = httpx.post(f"{server.url}/v1/retrieve", json=bad, timeout=WAIT_S)
        assert again.status_code == 500 and again.json()["error"]["code"] == "embedding_failed"
        # A value past the bound never reaches the tower: 422 naming the field.
        far = {"query": {"age": 1e30}, "k": 5}
        refused = httpx.post(f"{server.url}/v1/retrieve", json=far, timeout=WAIT_S)
        assert refused.status_code == 422 and refused.json()["error"]["field"] == "query.age"


def test_row20_one_heavy_exclusion_does_not_deepen_the_other_searches(
    make_settings: Callable[..., ServiceSettings],
) -> None:
    """One query excluding 40 items among 5 plain ones (k = 5) in one micro-batch: the 5
    plain queries are searched at k = 5 (not 45), the heavy one alone at 45; every answer
    equals its answer alone, and the heavy one has its 5 results, none excluded."""
    with live_server(make_settings(batch_workers=1, request_timeout_s=10)) as server:
        catalog = server.services.index_manager.current.ids.tolist()
        plain = [{"query": {"history": catalog[3 * i : 3 * i + 2]}, "k": 5} for i in range(5)]
        excluded = catalog[:40]
        heavy = {"query": {"history": catalog[40:42]}, "k": 5, "exclude_ids": excluded}
        calls = record_searches(server)
        responses = one_batch(server, [*plain[:2], heavy, *plain[2:]])
        assert [r.status_code for r in responses] == [200] * 6
        # the blocker (1 row, k = 1), the plain rows at their own k, the heavy row alone
        assert sorted(calls) == sorted([(1, 1), (5, 5), (1, 45)]), calls
        answers = [r.json()["ids"] for r in responses]
        for body, ids in zip([*plain[:2], heavy, *plain[2:]], answers, strict=True):
            alone = httpx.post(f"{server.url}/v1/retrieve", json=body, timeout=WAIT_S)
            assert alone.status_code == 200 and alone.json()["ids"] == ids, body
        assert len(answers[2]) == 5 and not set(answers[2]) & set(excluded)


def test_row20_exclude_seen_drops_only_the_most_recent_max_seen_ids(
    make_settings: Callable[..., ServiceSettings], tiny_dataset: Path
) -> None:
    """`max_seen_ids` = 3 and a user with more seen items: with k = catalog - 3 the answer
    is the whole catalog but the user's last 3 seen items (the older ones come back), and
    the search asked for k + 3 = the catalog, not k + every seen item."""
    records = dict(iter_user_records(tiny_dataset, [], 0))
    user, record = max(records.items(), key=lambda pair: len(pair[1].seen))
    assert len(record.seen) > 6
    with live_server(make_settings(max_seen_ids=3)) as server:
        catalog = server.services.index_manager.current.ids.tolist()
        calls = record_searches(server)
        body = {"user_id": user, "exclude_seen": True, "k": len(catalog) - 3}
        response = httpx.post(f"{server.url}/v1/retrieve", json=body, timeout=WAIT_S)
        assert response.status_code == 200
        ids = response.json()["ids"]
        assert set(ids) == set(catalog) - set(record.seen[-3:]) and len(ids) == len(catalog) - 3
        assert set(record.seen[:-3]) <= set(ids)  # older seen items are not excluded
        assert calls == [(1, len(catalog))]
        info = httpx.get(f"{server.url}/v1/info", timeout=WAIT_S).json()
        assert info["limits"]["max_seen_ids"] == 3


def test_row21_code_caches_stay_bounded_under_unknown_and_rotating_values(
    make_settings: Callable[..., ServiceSettings],
) -> None:
    """Without prefill, `code_cache_size` = 8: 40 requests, each with never-seen categorical
    values and history ids (unknown ones and 40 distinct catalog ids in all). No feature's
    cache ever holds more than 8 values + null, unknown values hold none, and a probe
    query is answered the same before and after (evicted codes are looked up again)."""
    with live_server(make_settings(prefill_codes=False, code_cache_size=8)) as server:
        catalog = server.services.index_manager.current.ids.tolist()
        probe = {"query": {"history": catalog[:3], "occupation": "writer"}, "k": 5}
        before = httpx.post(f"{server.url}/v1/retrieve", json=probe, timeout=WAIT_S)
        assert before.status_code == 200
        for i in range(40):
            body = {
                "query": {
                    "zip_prefix": f"zz{i}",
                    "occupation": f"no-such-job-{i}",
                    "history": [catalog[(i + 3) % len(catalog)], f"no-such-item-{i}"],
                },
                "k": 3,
            }
            assert httpx.post(f"{server.url}/v1/retrieve", json=body).status_code == 200
            sizes = server.services.retriever.batch_encoder.cached_values()
            assert all(size <= 8 + 1 for size in sizes.values()), (i, sizes)
        assert sizes["history"] == 8  # full: the 8 most recent catalog ids
        assert sizes["zip_prefix"] <= 1 and sizes["occupation"] <= 2  # null (and "writer")
        info = httpx.get(f"{server.url}/v1/info", timeout=WAIT_S).json()
        assert info["code_cache_values"] == sizes and info["limits"]["code_cache_size"] == 8
        after = httpx.post(f"{server.url}/v1/retrieve", json=probe, timeout=WAIT_S)
        assert after.status_code == 200 and after.json()["ids"] == before.json()["ids"]
