"""Row 4 of the reliability suite: schemathesis over the service's own OpenAPI document,
every built-in check, against the real service (uvicorn on loopback, API key on).

The document is the one the service serves (`service.openapi`): the query object lists
the loaded model's features, k is bounded by the settings, and the cross-field rules are
spelled out, so the positive/negative data checks hold the service to its word. The
model is trained for a few steps on a tiny dataset whose query tower reads every kind of
value a request can carry (categorical, dense, bag, hashed and history:
`tiny_data.make_rich_query_dataset`), so the generated queries exercise each kind's
checks. The number of generated examples is bounded (`EXAMPLES` per operation and phase).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from pydantic import SecretStr
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS, load_all_checks
from service_fixtures import LiveServer

from service.settings import ServiceSettings

KEY = "schemathesis-key-0123456789"
EXAMPLES = 100
load_all_checks()  # the OpenAPI checks register themselves on import
ALL_CHECKS = CHECKS.get_all()


@pytest.fixture(scope="module")
def rich_artifacts(tmp_path_factory: Any) -> tuple[Path, Path, Path]:
    """(dataset, model bundle, index root): the rich-query dataset, a model trained on it
    for one epoch (no refit, no baselines: seconds), a Flat index of its catalog."""
    from service_fixtures import build_flat_index
    from tiny_data import make_rich_query_dataset, tiny_train_config

    from training.trainer import train

    root = tmp_path_factory.mktemp("schemathesis")
    data = make_rich_query_dataset(root / "data")
    config = tiny_train_config(
        epochs=1,
        refit=False,
        eval={"ks": [10], "metric": "recall@10", "patience": 1, "baselines": []},
    )
    train(data, root / "model", config, progress=False)
    build_flat_index(root / "model", data, root / "index")
    return data, root / "model", root / "index"


@pytest.fixture(scope="module")
def live_api(rich_artifacts: tuple[Path, Path, Path]) -> Iterator[LiveServer]:
    from service_fixtures import free_port

    data, model, index = rich_artifacts
    settings_ = ServiceSettings(
        model_dir=model,
        index_root=index,
        data_dir=data,  # user_id queries work (404 for unknown users)
        port=free_port(),
        api_key=SecretStr(KEY),
        max_k=100,
        max_batch_queries=4,
        max_exclude_ids=50,
    )
    server = LiveServer(settings_).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def api_schema(live_api: LiveServer) -> Any:
    return schemathesis.openapi.from_url(f"{live_api.url}/openapi.json")


def test_row4_the_model_reads_every_kind_of_query_value(live_api: LiveServer) -> None:
    kinds = {spec["kind"] for spec in live_api.services.schema.describe().values()}
    assert {"categorical", "dense", "bag", "hashed", "history"} <= kinds


def test_row4_every_check_is_loaded() -> None:
    names = {check.__name__ for check in ALL_CHECKS}
    assert {
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
        "positive_data_acceptance",
        "ignored_auth",
        "unsupported_method",
    } <= names


def test_row4_schemathesis_all_checks_on_every_operation(
    live_api: LiveServer, api_schema: Any
) -> None:
    """Positive and negative examples for every operation, every check on every answer.

    (schemathesis' own pytest plugin does not run under pytest 9, so the operations are
    driven through its Python API with hypothesis directly.)
    """
    failures: dict[str, str] = {}
    tested: list[str] = []
    calls = {"n": 0}
    for result in api_schema.get_all_operations():
        operation = result.ok()
        for mode in GenerationMode:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,  # the same examples every run
                suppress_health_check=list(HealthCheck),
            )
            def run(case: Any) -> None:
                calls["n"] += 1
                response = case.call_and_validate(
                    base_url=live_api.url, headers={"X-API-Key": KEY}, checks=ALL_CHECKS, timeout=10
                )
                assert response.status_code < 500
                assert "Traceback" not in response.text and 'File "' not in response.text

            label = f"{operation.label} ({mode.value})"
            try:
                run()
            except Unsatisfiable:
                # an operation without any input (GET /healthz...) has no negative example
                if mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET":
                    continue
                failures[label] = "no example could be generated"
            except Exception as exc:  # every operation runs; all failures are reported
                failures[label] = f"{type(exc).__name__}: {str(exc)[:2000]}"
            tested.append(label)
    assert not failures, "\n\n".join(f"{k}: {v}" for k, v in failures.items())
    operations = {label.split(" (")[0] for label in tested}
    assert {
        "POST /v1/retrieve",
        "POST /v1/retrieve/batch",
        "GET /v1/info",
        "GET /readyz",
    } <= operations
    assert calls["n"] >= 4 * EXAMPLES  # examples really ran (each operation and mode bounded)


def test_row4_the_document_describes_the_loaded_model(
    live_api: LiveServer, make_settings: Callable[..., ServiceSettings]
) -> None:
    import httpx

    spec = httpx.get(f"{live_api.url}/openapi.json").json()
    request = spec["components"]["schemas"]["RetrieveRequest"]
    query = request["properties"]["query"]["anyOf"][0]
    assert query["additionalProperties"] is False
    assert set(query["properties"]) == set(live_api.services.schema.known)
    assert request["properties"]["k"]["anyOf"][0] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 100,
    }
    assert spec["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"
    # without an API key, the document does not claim one is needed
    from service_fixtures import live_server

    with live_server(make_settings()) as open_server:
        open_spec = httpx.get(f"{open_server.url}/openapi.json").json()
    assert "securitySchemes" not in open_spec.get("components", {})
    assert all("security" not in op for ops in open_spec["paths"].values() for op in ops.values())
