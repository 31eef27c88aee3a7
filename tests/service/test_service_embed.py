"""POST /v1/embed and /v1/embed/batch: the query embedding equals the one computed in
process (the bundle's query tower over the encoder's encoding, and the offline evaluation's
query for a `user_id`), is unit norm and names the versions /v1/info shows; the route keeps
every promise of /v1/retrieve (API key, 422 naming the field, 404 for an unknown user, body
limit, admission limit, deadline, per-query errors in a shared micro-batch, metrics, the
OpenAPI document) and never touches the index or the response cache."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import SecretStr
from service_fixtures import (
    WAIT_S,
    free_port,
    live_server,
    make_dense_artifacts,
    slow_embed,
    wait_until,
)

from retrieval.bundle import load_bundle
from retrieval.data.dataset import load_dataset
from retrieval.evaluation import build_eval_queries, embed_in_batches
from retrieval.row_encoding import encode_query_rows
from service.app import create_app
from service.query import QuerySchema, normalize_query
from service.settings import ServiceSettings

QUERY = {"gender": "F", "occupation": "engineer", "age_bucket": "25-34", "history": ["m 003/x"]}
INLINE_QUERIES: list[dict[str, Any]] = [
    QUERY,
    {},  # every feature null
    {"gender": "M", "zip_prefix": "30", "history": ["m 010/x", "m 011/x", "no such item"]},
    {"occupation": "artist", "age_bucket": "unseen bucket"},  # unknown value -> OOV
]
MAX_DIFF = 1e-6


@pytest.fixture(scope="module")
def client(tiny_bundle: Path, tiny_index: Path, tiny_dataset: Path) -> Iterator[TestClient]:
    settings = ServiceSettings(
        model_dir=tiny_bundle,
        index_root=tiny_index,
        data_dir=tiny_dataset,
        max_batch_queries=64,
        max_body_bytes=4096,
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def embed(client: TestClient, body: Any, **kwargs: Any) -> Any:
    return client.post("/v1/embed", json=body, **kwargs)


def in_process_embeddings(tiny_bundle: Path, queries: list[dict[str, Any]]) -> np.ndarray:
    """`[N, D]`: the bundle's eager query tower over the encoder's reference encoding."""
    bundle = load_bundle(tiny_bundle)
    schema = QuerySchema.from_encoder(bundle.encoder)
    rows = [normalize_query(query, schema) for query in queries]
    batch = encode_query_rows(bundle.encoder, rows)
    with torch.inference_mode():
        return bundle.model.query_tower(batch).numpy()


def count_searches(services: Any) -> list[int]:
    """Rows of every later search of the serving index version (one entry per search)."""
    calls: list[int] = []
    current = services.index_manager.current
    original = current.search

    def search(query_emb: Any, k: int) -> Any:
        calls.append(len(query_emb))
        return original(query_emb, k)

    current.search = search
    return calls


# --------------------------------------------------------------------------- the embedding


def test_inline_embeddings_equal_the_in_process_query_tower(
    client: TestClient, tiny_bundle: Path
) -> None:
    expected = in_process_embeddings(tiny_bundle, INLINE_QUERIES)  # (4, D)
    for query, reference in zip(INLINE_QUERIES, expected, strict=True):
        response = embed(client, {"query": query})
        assert response.status_code == 200, response.text
        got = np.asarray(response.json()["embedding"], dtype=np.float64)
        assert got.shape == reference.shape
        assert float(np.abs(got - reference).max()) <= MAX_DIFF, query
    # the queries differ, and so do their embeddings: the comparison is not vacuous
    assert float(np.abs(expected[0] - expected[1]).max()) > 1e-3


def test_user_id_embeddings_equal_the_offline_evaluation_queries(
    client: TestClient, tiny_bundle: Path, tiny_dataset: Path
) -> None:
    """Every test user of the tiny dataset: `user_id` through /v1/embed/batch equals the
    query the offline evaluation embeds for that user (features + last N train/valid items)."""
    bundle = load_bundle(tiny_bundle)
    queries = build_eval_queries(bundle.encoder, load_dataset(tiny_dataset), "test")
    with torch.inference_mode():
        offline = embed_in_batches(bundle.model.embed_queries, queries.query_batch).numpy()
    user_ids = bundle.encoder.user_ids.take(pa.array(queries.user_rows)).to_pylist()
    response = client.post(
        "/v1/embed/batch", json={"queries": [{"user_id": user} for user in user_ids]}
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(user_ids) == len(offline) > 10
    online = np.asarray([result["embedding"] for result in results], dtype=np.float64)
    assert float(np.abs(online - offline).max()) <= MAX_DIFF
    # one user alone gets the answer it got inside the batch call
    alone = embed(client, {"user_id": user_ids[3]}).json()["embedding"]
    assert float(np.abs(np.asarray(alone) - online[3]).max()) <= MAX_DIFF


def test_embedding_is_unit_norm_with_the_versions_of_info(client: TestClient) -> None:
    info = client.get("/v1/info").json()
    body = embed(client, {"query": QUERY}).json()
    assert set(body) == {
        "embedding",
        "dim",
        "model_version",
        "index_version",
        "normalized",
        "took_ms",
    }
    vector = np.asarray(body["embedding"], dtype=np.float64)
    assert body["dim"] == len(vector) == info["model"]["output_dim"] == info["index"]["dim"] == 16
    assert abs(float(np.linalg.norm(vector)) - 1.0) <= 1e-5
    assert body["normalized"] is True
    assert body["model_version"] == info["model"]["version"]
    assert body["index_version"] == info["index"]["version"]
    # the embedding is what retrieval searches with: its inner products with the index's
    # item vectors are the scores /v1/retrieve returns
    retrieved = client.post("/v1/retrieve", json={"query": QUERY, "k": 5}).json()
    index = client.app.state.services.index_manager.current  # type: ignore[attr-defined]
    rows = [int(np.flatnonzero(index.ids == item)[0]) for item in retrieved["ids"]]
    items = np.stack([index.loaded.index.reconstruct(row) for row in rows])  # (5, D)
    assert np.allclose(items @ vector, retrieved["scores"], atol=1e-5)
    assert retrieved["model_version"] == body["model_version"]
    assert retrieved["index_version"] == body["index_version"]


def test_embed_goes_through_the_micro_batcher_and_never_searches(client: TestClient) -> None:
    services = client.app.state.services  # type: ignore[attr-defined]
    searches = count_searches(services)
    batches = services.retriever.timings.batches
    try:
        assert embed(client, {"query": QUERY}).status_code == 200
        assert client.post("/v1/embed/batch", json={"queries": [{"query": {}}] * 3}).is_success
        assert services.retriever.timings.batches > batches  # the batch worker embedded them
        assert searches == []
        assert client.post("/v1/retrieve", json={"query": QUERY, "k": 3}).status_code == 200
        assert searches == [1]  # the counter sees searches: retrieve's, not embed's
    finally:
        del services.index_manager.current.search


def test_batch_answers_in_order_and_checks_every_query(client: TestClient) -> None:
    queries = [{"query": QUERY}, {"user_id": "u002"}, {"query": {}, "user_id": "u003"}]
    response = client.post("/v1/embed/batch", json={"queries": queries})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"results", "took_ms"} and len(body["results"]) == 3
    for query, result in zip(queries, body["results"], strict=True):
        alone = embed(client, query).json()
        assert np.abs(np.subtract(alone["embedding"], result["embedding"])).max() <= MAX_DIFF
        assert result["dim"] == 16 and result["normalized"] is True
    first, second = (np.asarray(r["embedding"]) for r in body["results"][:2])
    assert float(np.abs(first - second).max()) > 1e-3  # different queries, different answers
    too_many = client.post("/v1/embed/batch", json={"queries": [{"query": {}}] * 65})
    assert too_many.status_code == 422
    assert too_many.json()["error"] == {
        "code": "invalid_request",
        "message": "`queries` must hold at most 64 queries; got 65",
        "field": "queries",
    }
    bad = client.post("/v1/embed/batch", json={"queries": [{"query": {}}, {"query": {"x": 1}}]})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "queries[1].query.x"
    empty = client.post("/v1/embed/batch", json={"queries": []})
    assert empty.status_code == 422 and empty.json()["error"]["field"] == "queries"


# --------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        ({"query": {"agee": "x"}}, "query.agee", "unknown query feature 'agee'"),
        ({"query": {"gender": 2.5}}, "query.gender", "string or an integer"),
        ({"query": {"history": "m 003/x"}}, "query.history", "list of item ids"),
        ({"query": {"history": ["m 003/x", None]}}, "query.history", "got null"),
        ({}, "query", "needs `query`"),
        ({"user_id": None}, "query", "needs `query`"),
        ({"user_id": ""}, "user_id", "at least 1 character"),
        ({"query": {}, "k": 10}, "k", "Extra inputs are not permitted"),
        ({"query": {}, "exclude_seen": True}, "exclude_seen", "Extra inputs"),
        ({"query": "gender=F"}, "query", "valid dictionary"),
        (["query"], "body", "valid dictionary"),
    ],
)
def test_bad_requests_are_422_naming_the_field(
    client: TestClient, body: Any, field: str, fragment: str
) -> None:
    response = embed(client, body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["field"] == field
    assert fragment in error["message"], error["message"]
    assert "Traceback" not in response.text


def test_broken_json_non_finite_numbers_and_large_bodies(client: TestClient) -> None:
    headers = {"content-type": "application/json"}
    broken = client.post("/v1/embed", content=b'{"query": ', headers=headers)
    assert broken.status_code == 422 and "not valid JSON" in broken.json()["error"]["message"]
    nan = client.post("/v1/embed", content=b'{"query": {"gender": NaN}}', headers=headers)
    assert nan.status_code == 422 and nan.json()["error"]["field"] == "query.gender"
    not_utf8 = client.post("/v1/embed", content=b'{"query": {"gender": "\xff"}}', headers=headers)
    assert not_utf8.status_code == 422 and not_utf8.json()["error"]["field"] == "body"
    big = {"query": {"history": ["m 003/x"] * 600}}  # > 4096 bytes
    too_large = client.post("/v1/embed", json=big)
    assert too_large.status_code == 413
    assert too_large.json()["error"]["code"] == "payload_too_large"


def test_unknown_user_is_answered_as_retrieve_answers_it(client: TestClient) -> None:
    for body in ({"user_id": "nobody"}, {"query": QUERY, "user_id": "nobody"}):
        embedded = embed(client, body)
        retrieved = client.post("/v1/retrieve", json=body)
        assert embedded.status_code == retrieved.status_code, body
        if embedded.status_code != 200:
            assert embedded.json() == retrieved.json()
    alone = embed(client, {"user_id": "nobody"})
    assert alone.status_code == 404
    assert alone.json()["error"] == {
        "code": "unknown_user",
        "message": "user 'nobody' is not in the feature store (embedded)",
        "field": "user_id",
    }
    # inline features are used as they are: the unknown user is not looked up
    inline = embed(client, {"query": QUERY, "user_id": "nobody"})
    assert inline.status_code == 200
    assert inline.json()["embedding"] == embed(client, {"query": QUERY}).json()["embedding"]
    batch = {"queries": [{"query": {}}, {"user_id": "nobody"}]}
    in_batch = client.post("/v1/embed/batch", json=batch)
    assert in_batch.status_code == 404 and in_batch.json()["error"]["field"] == "queries[1].user_id"


def test_a_service_without_feature_store_refuses_user_id_clearly(
    tiny_bundle: Path, tiny_index: Path
) -> None:
    settings = ServiceSettings(model_dir=tiny_bundle, index_root=tiny_index)
    with TestClient(create_app(settings)) as no_store:
        response = embed(no_store, {"user_id": "u001"})
        assert response.status_code == 422 and "--data" in response.json()["error"]["message"]


# --------------------------------------------------------------------------- guards


def test_api_key_is_required_when_configured(tiny_bundle: Path, tiny_index: Path) -> None:
    key = "k" * 24
    settings = ServiceSettings(model_dir=tiny_bundle, index_root=tiny_index, api_key=SecretStr(key))
    with TestClient(create_app(settings)) as keyed:
        unauthorized = {"error": {"code": "unauthorized", "message": "missing or invalid API key"}}
        for headers in ({}, {"X-API-Key": "x" * 24}, {"Authorization": f"Bearer {key}"}):
            for path, body in (
                ("/v1/embed", {"query": {}}),
                ("/v1/embed", {"query": {"zzz": 1}}),  # the key is checked before the body
                ("/v1/embed/batch", {"queries": [{"query": {}}]}),
            ):
                response = keyed.post(path, json=body, headers=headers)
                assert response.status_code == 401, (path, headers)
                assert response.json() == unauthorized
                assert key not in response.text
        ok = embed(keyed, {"query": {}}, headers={"X-API-Key": key})
        assert ok.status_code == 200 and len(ok.json()["embedding"]) == 16
        batch = keyed.post(
            "/v1/embed/batch", json={"queries": [{"query": {}}]}, headers={"X-API-Key": key}
        )
        assert batch.status_code == 200
        metrics = keyed.get("/metrics").text
        assert 'retrieval_http_requests_total{method="POST",route="/v1/embed",status="401"}' in (
            metrics
        )


def test_requests_are_counted_under_the_route(client: TestClient) -> None:
    embed(client, {"query": {}})
    embed(client, {"query": {"nope": 1}})
    client.post("/v1/embed/batch", json={"queries": [{"query": {}}]})
    text = client.get("/metrics").text
    for route, status in (("/v1/embed", 200), ("/v1/embed", 422), ("/v1/embed/batch", 200)):
        line = f'retrieval_http_requests_total{{method="POST",route="{route}",status="{status}"}}'
        assert line in text, line


def test_overload_is_429_with_retry_after(client: TestClient) -> None:
    limiter = client.app.state.services.limiter  # type: ignore[attr-defined]
    held = limiter.in_flight
    limiter.in_flight = limiter.limit  # every admission taken
    try:
        response = embed(client, {"query": {}})
        batch = client.post("/v1/embed/batch", json={"queries": [{"query": {}}]})
    finally:
        limiter.in_flight = held
    for refused in (response, batch):
        assert refused.status_code == 429 and refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == "overloaded"
    assert embed(client, {"query": {}}).status_code == 200


def test_a_slow_tower_gives_504_at_the_deadline(tiny_bundle: Path, tiny_index: Path) -> None:
    settings = ServiceSettings(model_dir=tiny_bundle, index_root=tiny_index, request_timeout_s=0.2)
    with TestClient(create_app(settings)) as slow:
        services = slow.app.state.services  # type: ignore[attr-defined]
        undo = slow_embed(services, 1.0, batches=1)
        try:
            response = embed(slow, {"query": {}})
        finally:
            undo()
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "deadline_exceeded"
        assert wait_until(lambda: services.limiter.in_flight == 0)  # the slot is free again


def test_the_openapi_document_describes_embed(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path in ("/v1/embed", "/v1/embed/batch"):
        operation = spec["paths"][path]["post"]
        assert {"200", "401", "404", "413", "422", "429", "503", "504"} <= set(
            operation["responses"]
        )
    schemas = spec["components"]["schemas"]
    request = schemas["EmbedRequest"]
    query = request["properties"]["query"]["anyOf"][0]
    assert query["additionalProperties"] is False
    services = client.app.state.services  # type: ignore[attr-defined]
    assert set(query["properties"]) == set(services.schema.known)
    assert request["additionalProperties"] is False and "k" not in request["properties"]
    required = [rule["required"] for rule in request["allOf"][0]["anyOf"]]
    assert required == [["query"], ["user_id"]]
    assert schemas["BatchEmbedRequest"]["properties"]["queries"]["maxItems"] == 64
    response = schemas["EmbedResponse"]
    assert set(response["required"]) >= {"embedding", "dim", "model_version", "index_version"}
    assert all(field.get("description") for field in response["properties"].values())


# --------------------------------------------------------------------------- shared batches


def one_batch(server: Any, requests: list[tuple[str, dict[str, Any]]]) -> list[httpx.Response]:
    """POST `requests` ((path, body) pairs) so that they run as ONE micro-batch: a first
    retrieval holds the only batch worker (its tower waits on a gate) while the others queue
    up; the gate opens once all are queued. Needs ``batch_workers=1``."""
    services = server.services
    batcher = services.batcher
    assert batcher.workers == 1
    gate = threading.Event()
    original = services.retriever.embed

    def gated(batch: Any) -> Any:
        gate.wait(timeout=WAIT_S)
        return original(batch)

    async def until(condition: Callable[[], bool], what: str) -> None:
        for _ in range(int(WAIT_S / 0.005)):
            if condition():
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"timed out waiting for {what}")

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=WAIT_S) as http:
            blocker = asyncio.ensure_future(http.post("/v1/retrieve", json={"query": {}, "k": 1}))
            await until(lambda: batcher.in_batch == 1, "the blocking batch")
            sent = [asyncio.ensure_future(http.post(path, json=b)) for path, b in requests]
            await until(lambda: batcher.queue_depth == len(requests), "the queued requests")
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
    assert batcher.batch_sizes[-1] == len(requests)  # they did share one batch
    return responses


def test_a_poisoned_embedding_fails_alone_in_a_batch_shared_with_retrievals(
    tmp_path: Path,
) -> None:
    """Embeds and retrievals in one micro-batch; one embed carries an age that passes the
    checks and that the (wrapped) tower turns into NaN, as an overflow would. That one
    answers 500 `embedding_failed`; the others answer 200 with what they get alone."""
    bundle, index = make_dense_artifacts(tmp_path)
    settings = ServiceSettings(
        model_dir=bundle, index_root=index, port=free_port(), batch_workers=1, request_timeout_s=10
    )
    countries = ["fr", "de", "it"]
    queries = [
        {"country": countries[i % 3], "age": 20.0 + 5 * i, "history": [f"i{i}"]} for i in range(4)
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
        bad = {"country": "fr", "age": stats.mean + 5e5 * stats.std, "history": ["i1"]}
        requests = [
            ("/v1/embed", {"query": queries[0]}),
            ("/v1/retrieve", {"query": queries[1], "k": 5}),
            ("/v1/embed", {"query": bad}),
            ("/v1/embed", {"query": queries[2]}),
            ("/v1/retrieve", {"query": queries[3], "k": 5}),
        ]
        responses = one_batch(server, requests)
        assert [r.status_code for r in responses] == [200, 200, 500, 200, 200]
        error = responses[2].json()["error"]
        assert error["code"] == "embedding_failed" and "non-finite" in error["message"]
        assert "Traceback" not in responses[2].text
        for i in (0, 1, 3, 4):
            path, body = requests[i]
            alone = httpx.post(f"{server.url}{path}", json=body, timeout=WAIT_S)
            assert alone.status_code == 200
            if path == "/v1/embed":
                got = np.asarray(responses[i].json()["embedding"])
                assert float(np.abs(got - alone.json()["embedding"]).max()) <= MAX_DIFF
            else:
                assert responses[i].json()["ids"] == alone.json()["ids"]
        # a value past the accepted interval never reaches the tower
        far = httpx.post(f"{server.url}/v1/embed", json={"query": {"age": 1e30}}, timeout=WAIT_S)
        assert far.status_code == 422 and far.json()["error"]["field"] == "query.age"


@pytest.mark.redis
def test_embed_neither_reads_nor_writes_the_response_cache(
    make_settings: Callable[..., ServiceSettings], shared_redis: tuple[str, str]
) -> None:
    url, prefix = shared_redis
    settings = make_settings(port=free_port(), redis_url=url, redis_prefix=prefix, data_dir=None)
    body = {"query": QUERY, "k": 5}
    with live_server(settings) as server:
        cache = server.services.cache
        assert cache is not None
        embedded = httpx.post(f"{server.url}/v1/embed", json={"query": QUERY}, timeout=WAIT_S)
        assert embedded.status_code == 200
        assert wait_until(lambda: not cache._writes, 5)
        first = httpx.post(f"{server.url}/v1/retrieve", json=body, timeout=WAIT_S).json()
        assert first["cached"] is False and len(first["ids"]) == 5  # embed wrote nothing
        assert wait_until(lambda: not cache._writes, 5)
        again = httpx.post(f"{server.url}/v1/embed", json={"query": QUERY}, timeout=WAIT_S)
        assert again.json()["embedding"] == embedded.json()["embedding"]  # not a cached answer
        second = httpx.post(f"{server.url}/v1/retrieve", json=body, timeout=WAIT_S).json()
        assert second["cached"] is True and second["ids"] == first["ids"]
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'retrieval_cache_requests_total{result="hit"} 1.0' in metrics
