"""The real app through FastAPI's TestClient: inline and user_id queries, exclusions, the batch
endpoint, validation errors, API key, body limit, error mapping, metrics, info, probes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import SecretStr
from service_fixtures import make_dense_artifacts

from retrieval.bundle import load_bundle
from retrieval.index_store import load_index_version
from retrieval.row_encoding import encode_query_rows
from service.app import create_app
from service.dependencies import get_engine
from service.errors import DependencyError, NotReadyError
from service.feature_store import InProcessFeatureStore
from service.query import QuerySchema, normalize_query
from service.routes.retrieve import LEAN_RETRIEVE_ROUTE
from service.schemas import RetrieveRequest
from service.settings import ServiceSettings

QUERY = {"gender": "F", "occupation": "engineer", "age_bucket": "25-34", "history": ["m 003/x"]}


@pytest.fixture(scope="module")
def client(tiny_bundle: Path, tiny_index: Path, tiny_dataset: Path) -> Iterator[TestClient]:
    settings = ServiceSettings(
        model_dir=tiny_bundle,
        index_root=tiny_index,
        data_dir=tiny_dataset,
        max_batch_queries=4,
        max_body_bytes=4096,
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def store(tiny_bundle: Path, tiny_dataset: Path) -> InProcessFeatureStore:
    schema = QuerySchema.from_schema(load_bundle(tiny_bundle).encoder.schema)
    return InProcessFeatureStore.from_dataset(
        tiny_dataset, list(schema.columns), schema.history_length
    )


def retrieve(client: TestClient, body: dict[str, Any], **kwargs: Any) -> Any:
    return client.post("/v1/retrieve", json=body, **kwargs)


def expected_ids(tiny_bundle: Path, tiny_index: Path, query: dict[str, Any], k: int) -> list[str]:
    """The same query computed in process: eager query tower + the index version's search."""
    bundle = load_bundle(tiny_bundle)
    schema = QuerySchema.from_schema(bundle.encoder.schema)
    batch = encode_query_rows(bundle.encoder, [normalize_query(query, schema)])
    with torch.inference_mode():
        emb = bundle.model.embed_queries(batch).numpy()
    ids, _ = load_index_version(tiny_index).search_ids(emb, k)
    return ids[0]


def test_probes_info_and_docs(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    info = client.get("/v1/info").json()
    assert info["catalog_size"] == 120 and info["index"]["factory"] == "Flat"
    assert info["model"]["output_dim"] == info["index"]["dim"] == 16
    assert info["schema"]["history"]["order"] == "most recent first"
    assert info["feature_store"] == "embedded"
    spec = client.get("/openapi.json").json()
    assert "/v1/retrieve" in spec["paths"] and "/v1/retrieve/batch" in spec["paths"]
    assert client.get("/docs").status_code == 200


def test_inline_query_matches_in_process_search(
    client: TestClient, tiny_bundle: Path, tiny_index: Path
) -> None:
    response = retrieve(client, {"query": QUERY, "k": 25})
    assert response.status_code == 200
    body = response.json()
    assert len(body["ids"]) == len(body["scores"]) == 25
    assert body["scores"] == sorted(body["scores"], reverse=True)
    assert body["index_version"] == load_index_version(tiny_index).version
    assert body["model_version"] == load_bundle(tiny_bundle).version
    assert body["ids"] == expected_ids(tiny_bundle, tiny_index, QUERY, 25)


def test_default_k_is_capped_by_the_catalog(client: TestClient) -> None:
    body = retrieve(client, {"query": {}}).json()  # default k 1000 > 120 items
    assert len(body["ids"]) == 120 and len(set(body["ids"])) == 120


def test_user_id_query_and_exclusions(client: TestClient, store: InProcessFeatureStore) -> None:
    user = "u005"
    seen = set(store._records[user].seen)
    plain = retrieve(client, {"user_id": user, "k": 50}).json()["ids"]
    assert seen & set(plain)  # this user's seen items do rank high without the exclusion
    body = retrieve(client, {"user_id": user, "k": 50, "exclude_seen": True}).json()
    assert len(body["ids"]) == 50 and not seen & set(body["ids"])
    explicit = body["ids"][:3]
    again = retrieve(
        client, {"user_id": user, "k": 50, "exclude_seen": True, "exclude_ids": explicit}
    ).json()
    assert len(again["ids"]) == 50  # still k results
    assert not (seen | set(explicit)) & set(again["ids"])
    assert again["ids"][:47] == body["ids"][3:]  # the rest keeps its order
    # more exclusions than the catalog can make up: every remaining item, once
    rest = retrieve(client, {"user_id": user, "k": 120, "exclude_seen": True}).json()
    assert len(rest["ids"]) == 120 - len(seen)


def test_inline_query_with_user_id_takes_seen_items_from_the_store(
    client: TestClient, store: InProcessFeatureStore
) -> None:
    seen = set(store._records["u001"].seen)
    body = retrieve(client, {"query": QUERY, "user_id": "u001", "k": 30, "exclude_seen": True})
    assert body.status_code == 200 and not seen & set(body.json()["ids"])


def test_batch_endpoint(client: TestClient) -> None:
    queries = [
        {"query": QUERY, "k": 5},
        {"user_id": "u002", "k": 7, "exclude_seen": True},
        {"user_id": "u003", "k": 3},
    ]
    response = client.post("/v1/retrieve/batch", json={"queries": queries})
    assert response.status_code == 200
    results = response.json()["results"]
    assert [len(r["ids"]) for r in results] == [5, 7, 3]
    for query, result in zip(queries, results, strict=True):
        assert retrieve(client, query).json()["ids"] == result["ids"]
    too_many = client.post("/v1/retrieve/batch", json={"queries": [{"query": {}}] * 5})
    assert (
        too_many.status_code == 422 and "at most 4 queries" in too_many.json()["error"]["message"]
    )
    bad = client.post("/v1/retrieve/batch", json={"queries": [{"query": {}}, {"query": {"x": 1}}]})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "queries[1].query.x"


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        ({"query": {"agee": "x"}}, "query.agee", "unknown query feature 'agee'"),
        ({"query": {"gender": 2.5}}, "query.gender", "string or an integer"),
        ({"query": {"history": "m 003/x"}}, "query.history", "list of item ids"),
        ({"query": {}, "k": 0}, "k", "must be in [1, 2048]; got 0"),
        ({"query": {}, "k": 5000}, "k", "must be in [1, 2048]; got 5000"),
        ({"query": {}, "k": "10"}, "k", "valid integer"),
        ({"query": {}, "exclude_ids": [1]}, "exclude_ids.0", "valid string"),
        ({"query": {}, "exclude_seen": True}, "exclude_seen", "needs `user_id`"),
        ({"k": 5}, "query", "needs `query`"),
        ({"query": {}, "color": "red"}, "color", "Extra inputs"),
        ({"query": "gender=F"}, "query", "valid dictionary"),
    ],
)
def test_validation_errors_name_the_field(
    client: TestClient, body: dict[str, Any], field: str, fragment: str
) -> None:
    response = retrieve(client, body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["field"] == field
    assert fragment in error["message"]


def test_non_finite_numbers_and_broken_json_are_422(client: TestClient) -> None:
    headers = {"content-type": "application/json"}
    nan = client.post("/v1/retrieve", content=b'{"query": {"gender": NaN}}', headers=headers)
    assert nan.status_code == 422 and nan.json()["error"]["field"] == "query.gender"
    broken = client.post("/v1/retrieve", content=b'{"query": ', headers=headers)
    assert broken.status_code == 422 and "not valid JSON" in broken.json()["error"]["message"]


def test_unknown_user_is_404(client: TestClient) -> None:
    response = retrieve(client, {"user_id": "nobody"})
    assert response.status_code == 404
    assert response.json()["error"] == {
        "code": "unknown_user",
        "message": "user 'nobody' is not in the feature store (embedded)",
        "field": "user_id",
    }


def test_body_too_large_is_413_before_parsing(client: TestClient) -> None:
    big = json.dumps({"query": {}, "exclude_ids": ["x" * 100] * 100}).encode()  # > 4096 bytes
    declared = client.post(
        "/v1/retrieve", content=big, headers={"content-type": "application/json"}
    )
    assert declared.status_code == 413
    assert declared.json()["error"]["code"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer
        for start in range(0, len(big), 512):
            yield big[start : start + 512]

    chunked = client.post(
        "/v1/retrieve", content=chunks(), headers={"content-type": "application/json"}
    )
    assert chunked.status_code == 413
    small = client.post(
        "/v1/retrieve",
        content=chunks_of(b'{"query": {}, "k": 3}'),
        headers={"content-type": "application/json"},
    )
    assert small.status_code == 200 and len(small.json()["ids"]) == 3


def chunks_of(data: bytes) -> Iterator[bytes]:
    yield data[:5]
    yield data[5:]


def test_metrics_are_exposed(client: TestClient) -> None:
    retrieve(client, {"query": {}, "k": 3})
    retrieve(client, {"query": {"nope": 1}})
    text = client.get("/metrics").text
    assert 'retrieval_http_requests_total{method="POST",route="/v1/retrieve",status="200"}' in text
    assert 'retrieval_http_requests_total{method="POST",route="/v1/retrieve",status="422"}' in text
    assert "retrieval_http_request_duration_seconds_bucket" in text
    assert "retrieval_batch_size_bucket" in text and "retrieval_queue_depth 0.0" in text
    version = client.get("/v1/info").json()["index"]["version"]
    assert f'retrieval_index_version_info{{version="{version}"}} 1.0' in text
    assert 'retrieval_index_swaps_total{result="failed"} 0.0' in text
    assert "retrieval_cache_hit_ratio" in text and "retrieval_in_flight_requests" in text


def test_readiness_flips_when_draining(client: TestClient) -> None:
    services = client.app.state.services  # type: ignore[attr-defined]
    services.draining = True
    try:
        response = client.get("/readyz")
        assert response.status_code == 503 and response.json()["reason"] == "shutting down"
        assert response.headers["retry-after"] == "1"
        assert client.get("/healthz").status_code == 200
    finally:
        services.draining = False
    assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize("fast_path", [True, False])
def test_errors_map_to_status_codes_without_tracebacks(
    tiny_bundle: Path, tiny_index: Path, monkeypatch: pytest.MonkeyPatch, fast_path: bool
) -> None:
    """A failing engine gets the mapped status and a bare body, through the plain Starlette
    route (`fast_path`) and through FastAPI alike."""

    def failing(error: Exception) -> Any:
        async def prepare(*args: Any, **kwargs: Any) -> Any:
            raise error

        return prepare

    settings = ServiceSettings(model_dir=tiny_bundle, index_root=tiny_index, fast_path=fast_path)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        engine = client.app.state.services.engine  # type: ignore[attr-defined]
        unavailable = DependencyError("the feature store is unavailable", retry_after_s=2)
        monkeypatch.setattr(engine, "prepare", failing(unavailable))
        down = retrieve(client, {"user_id": "u001"})
        assert down.status_code == 503 and down.headers["retry-after"] == "2"
        assert down.json()["error"]["code"] == "dependency_unavailable"
        secret = RuntimeError("secret internal detail /etc/passwd")
        monkeypatch.setattr(engine, "prepare", failing(secret))
        crash = retrieve(client, {"query": {}})
        assert crash.status_code == 500
        assert crash.json() == {
            "error": {"code": "internal_error", "message": "internal server error"}
        }
        assert "Traceback" not in crash.text and "passwd" not in crash.text
        assert (LEAN_RETRIEVE_ROUTE in client.app.routes) == fast_path  # type: ignore[attr-defined]


def test_api_key(tiny_bundle: Path, tiny_index: Path) -> None:
    key = "k" * 24
    settings = ServiceSettings(model_dir=tiny_bundle, index_root=tiny_index, api_key=SecretStr(key))
    with TestClient(create_app(settings)) as client:
        missing = retrieve(client, {"query": {}, "k": 3})
        wrong = retrieve(client, {"query": {}, "k": 3}, headers={"X-API-Key": "x" * 24})
        for response in (missing, wrong):
            assert response.status_code == 401
            assert response.json() == {
                "error": {"code": "unauthorized", "message": "missing or invalid API key"}
            }
        # the key is checked before the body: a bad body without a key is still 401
        assert retrieve(client, {"query": {"zzz": 1}}).status_code == 401
        assert client.get("/v1/info").status_code == 401
        ok = retrieve(client, {"query": {}, "k": 3}, headers={"X-API-Key": key})
        assert ok.status_code == 200 and len(ok.json()["ids"]) == 3
        assert client.get("/healthz").status_code == 200  # probes stay open
        # without a feature store, user_id queries are refused clearly
        no_store = retrieve(client, {"user_id": "u001"}, headers={"X-API-Key": key})
        assert no_store.status_code == 422 and "--data" in no_store.json()["error"]["message"]


def test_answers_are_deterministic_ids_of_the_catalog(
    client: TestClient, tiny_bundle: Path
) -> None:
    catalog = set(load_bundle(tiny_bundle).encoder.item_ids.to_pylist())
    first = retrieve(client, {"query": QUERY, "k": 40}).json()
    second = retrieve(client, {"query": QUERY, "k": 40}).json()
    assert first["ids"] == second["ids"] and set(first["ids"]) <= catalog
    assert np.allclose(first["scores"], second["scores"])
    assert pa.array(first["ids"]).type == pa.string()


def test_dense_features_nan_is_422(tmp_path: Path) -> None:
    bundle, index = make_dense_artifacts(tmp_path)
    settings = ServiceSettings(model_dir=bundle, index_root=index)
    headers = {"content-type": "application/json"}
    with TestClient(create_app(settings)) as client:
        ok = retrieve(client, {"query": {"country": "fr", "age": 31.5, "history": ["i3"]}, "k": 5})
        assert ok.status_code == 200 and len(ok.json()["ids"]) == 5
        missing = retrieve(client, {"query": {"age": None}, "k": 5})
        assert missing.status_code == 200
        for literal in (b"NaN", b"Infinity", b"-Infinity"):
            body = b'{"query": {"age": ' + literal + b"}}"
            response = client.post("/v1/retrieve", content=body, headers=headers)
            assert response.status_code == 422, literal
            error = response.json()["error"]
            assert error["field"] == "query.age" and "finite number" in error["message"]
        wrong = retrieve(client, {"query": {"age": "31"}})
        assert wrong.status_code == 422 and "must be a number" in wrong.json()["error"]["message"]


def test_list_scanner_serves_what_faiss_serves(
    tiny_bundle: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    """An IVF-SQ8 version is searched by `ListScanner` (the default) with FAISS's answers."""
    from index.build import BuildOptions, build_index

    root = tmp_path / "index"
    options = BuildOptions(
        factory="IVF4,SQ8",
        search_params={"nprobe": 2},
        recall_floor=0.0,
        recall_queries=64,
        progress=False,
        threads=1,
    )
    build_index(tiny_bundle, tiny_dataset, root, options)
    bodies: list[dict[str, Any]] = [{"query": QUERY, "k": 20}, {"user_id": "u001", "k": 120}]
    answers: dict[bool, list[Any]] = {}
    for scanner in (True, False):
        settings = ServiceSettings(
            model_dir=tiny_bundle, index_root=root, data_dir=tiny_dataset, list_scanner=scanner
        )
        with TestClient(create_app(settings)) as test_client:
            info = test_client.get("/v1/info").json()["index"]
            assert info["search_path"] == ("cpu (list scanner)" if scanner else "cpu")
            answers[scanner] = [retrieve(test_client, body).json() for body in bodies]
    for body, got, want in zip(bodies, answers[True], answers[False], strict=True):
        assert len(got["ids"]) == len(want["ids"]) > 0
        np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-5)
        if len(want["ids"]) < body["k"]:  # every item of the probed lists: the same items
            assert set(got["ids"]) == set(want["ids"])


def test_fast_path_answers_like_fastapi(
    tiny_bundle: Path, tiny_index: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fast_path` on (the plain Starlette route `LEAN_RETRIEVE_ROUTE`) and off (the FastAPI
    route): the same answers (took_ms aside) and the same errors, malformed bodies, other
    content types and a wrong API key included; both counted under the route's label."""
    key = "k" * 24
    json_type = "application/json"
    requests: list[tuple[str | bytes, str | None]] = [
        (json.dumps({"query": QUERY, "k": 25}), json_type),
        (
            json.dumps(
                {"user_id": "u001", "k": 40, "exclude_seen": True, "exclude_ids": ["m 003/x"]}
            ),
            json_type,
        ),
        (
            json.dumps({"user_id": "u002", "query": QUERY, "k": 7.0}),
            "application/json; charset=utf-8",
        ),
        (json.dumps({"query": QUERY, "k": 3}), "application/vnd.api+json"),  # a JSON subtype
        (json.dumps({"query": QUERY, "k": 0}), json_type),  # 422 from the engine's check
        (json.dumps({"query": {"no_such_feature": 1}}), json_type),  # 422 from normalize_query
        (json.dumps({"user_id": "nobody"}), json_type),  # 404
        (json.dumps({"query": QUERY, "k": "5"}), json_type),  # 422 from pydantic
        (json.dumps({"query": QUERY, "surprise": 1}), json_type),  # 422 extra field
        ('{"query": {"age": NaN}, "k": 3}', json_type),  # json.loads reads NaN
        ("[1, 2]", json_type),  # not an object
        ("null", json_type),
        ("{not json", json_type),  # FastAPI's 'not valid JSON'
        (b'{"user_id": "u\xff"}', json_type),  # not UTF-8
        ("", json_type),  # an empty body
        (json.dumps({"query": QUERY}), "text/plain"),  # not a JSON content type
        (json.dumps({"query": QUERY}), None),  # no content type
    ]
    lean_parses: list[bytes] = []  # only the Starlette route validates from the bytes
    validate_json = RetrieveRequest.model_validate_json

    def counted(data: bytes, **kwargs: Any) -> RetrieveRequest:
        lean_parses.append(data)
        return validate_json(data, **kwargs)

    monkeypatch.setattr(RetrieveRequest, "model_validate_json", counted)
    seen: dict[bool, list[tuple[int, Any]]] = {}
    for fast_path in (True, False):
        settings = ServiceSettings(
            model_dir=tiny_bundle,
            index_root=tiny_index,
            data_dir=tiny_dataset,
            api_key=SecretStr(key),
            fast_path=fast_path,
        )
        lean_parses.clear()
        with TestClient(create_app(settings)) as client:
            answers = []
            for content, content_type in requests:
                headers = {"x-api-key": key}
                if content_type is not None:
                    headers["content-type"] = content_type
                response = client.post("/v1/retrieve", content=content, headers=headers)
                payload = response.json()
                payload.pop("took_ms", None)
                answers.append((response.status_code, payload))
            wrong_key = client.post(
                "/v1/retrieve",
                content=requests[0][0],
                headers={"content-type": json_type, "x-api-key": "x" * 24},
            )
            answers.append((wrong_key.status_code, wrong_key.json()))
            get = client.get("/v1/retrieve", headers={"x-api-key": key})
            answers.append((get.status_code, get.json()))
            metrics = client.get("/metrics").text
            for method, status in [("POST", s) for s in (200, 401, 404, 422)] + [("GET", 405)]:
                label = f'method="{method}",route="/v1/retrieve",status="{status}"'
                assert label in metrics, label
            # plain JSON content types only (14 of them); the rest go FastAPI's way at once
            assert len(lean_parses) == (14 if fast_path else 0)
            seen[fast_path] = answers
    assert seen[True] == seen[False]
    statuses = [status for status, _ in seen[True]]
    assert statuses == [200, 200, 200, 200, 422, 422, 404] + [422] * 10 + [401, 405], statuses


def test_fast_path_takes_dependency_overrides_and_checks_readiness_first(
    tiny_bundle: Path, tiny_index: Path
) -> None:
    """The plain Starlette route gets its objects through the FastAPI route's providers:
    an override of `get_engine` is used, and a body pydantic refuses answers 503 while the
    model is not loaded (as through FastAPI) but an undecodable body answers 422 first."""
    settings = ServiceSettings(model_dir=tiny_bundle, index_root=tiny_index, fast_path=True)
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        engine = client.app.state.services.engine  # type: ignore[attr-defined]
        calls: list[int] = []

        def override() -> Any:
            calls.append(1)
            return engine

        app.dependency_overrides[get_engine] = override
        assert retrieve(client, {"query": {}, "k": 3}).status_code == 200 and calls == [1]
        app.dependency_overrides.clear()

        async def not_loaded() -> Any:
            raise NotReadyError("the model and index are not loaded yet", retry_after_s=1)

        app.dependency_overrides[get_engine] = not_loaded
        assert retrieve(client, {"query": {}, "k": "5"}).status_code == 503
        bad_json = client.post(
            "/v1/retrieve", content="{x", headers={"content-type": "application/json"}
        )
        assert bad_json.status_code == 422 and bad_json.json()["error"]["field"] == "body"


def test_serve_reads_the_redis_url_from_a_file_flag_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`retrieval serve --redis-url-file F` (a flag wins over both variables), or
    RETRIEVAL_REDIS_URL / RETRIEVAL_REDIS_URL_FILE; the URL never shows in a dump."""
    from retrieval.cli import build_parser
    from service.cli import _settings_from_args

    secret_url = "redis://:file-secret@127.0.0.1:6390/0"
    url_file = tmp_path / "redis_url"
    url_file.write_text(secret_url + "\n")
    base = ["serve", "--model", "m", "--index", "i"]

    def settings(*flags: str) -> ServiceSettings:
        parsed: ServiceSettings = _settings_from_args(build_parser().parse_args([*base, *flags]))
        return parsed

    for name in ("RETRIEVAL_REDIS_URL", "RETRIEVAL_REDIS_URL_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert settings("--redis-url-file", str(url_file)).redis_url_value == secret_url
    monkeypatch.setenv("RETRIEVAL_REDIS_URL", "redis://env:6379/0")
    assert settings().redis_url_value == "redis://env:6379/0"
    assert settings("--redis-url-file", str(url_file)).redis_url_value == secret_url
    monkeypatch.delenv("RETRIEVAL_REDIS_URL")
    monkeypatch.setenv("RETRIEVAL_REDIS_URL_FILE", str(url_file))
    from_env_file = settings()
    assert from_env_file.redis_url_value == secret_url
    assert "file-secret" not in from_env_file.model_dump_json()
    assert settings("--redis-url", "redis://flag:6379/0").redis_url_value == "redis://flag:6379/0"
    with pytest.raises(SystemExit):  # one or the other
        build_parser().parse_args([*base, "--redis-url", "redis://x/0", "--redis-url-file", "f"])


@pytest.mark.parametrize("mode", ["export", "onnxruntime"])
def test_query_tower_modes_are_served(
    mode: str, tiny_bundle: Path, tiny_index: Path, tiny_dataset: Path
) -> None:
    """A mode that fails its start-up check falls back silently: check it is really served."""
    settings = ServiceSettings(
        model_dir=tiny_bundle, index_root=tiny_index, data_dir=tiny_dataset, query_tower_mode=mode
    )
    with TestClient(create_app(settings)) as mode_client:
        assert mode_client.get("/v1/info").json()["model"]["query_tower_mode"] == mode
        answer = retrieve(mode_client, {"query": QUERY, "k": 10})
        assert answer.status_code == 200
        assert answer.json()["ids"] == expected_ids(tiny_bundle, tiny_index, QUERY, 10)
