"""The OpenAPI document, made to say exactly what the running service accepts.

FastAPI derives the request schemas from the pydantic models, which know neither the
settings (`max_k`, `max_exclude_ids`, `max_batch_queries`) nor the loaded model's query
features, nor the rules checked in `service.engine` (a request needs `query` or
`user_id`; `exclude_seen` needs `user_id`). A client or a fuzzer (schemathesis) reading
that document would send bodies it calls valid and get 422. `install_openapi` replaces
`app.openapi` with a version that adds, to the generated document:

* `RetrieveRequest`: ``k`` in ``[1, max_k]``, at most ``max_exclude_ids`` exclusions, the
  two cross-field rules above;
* its ``query`` object: one property per query feature of the loaded bundle, with the
  JSON types `service.query` accepts for its kind, and no other property;
* `BatchRetrieveRequest`: at most ``max_batch_queries`` queries;
* `EmbedRequest` and `BatchEmbedRequest` (POST /v1/embed, /v1/embed/batch): the same
  ``query`` object and "`query` or `user_id`" rule, at most ``max_batch_queries`` queries;
* the ``X-API-Key`` security scheme only when an API key is configured.

Until the model is loaded the ``query`` object stays open (the document is then not
cached, so the first request after loading gets the full one).
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from retrieval.features import FeatureKind
from service.query import (
    LIST_KINDS,
    MAX_BAG_TOKENS,
    MAX_TOKEN_CHARS,
    SCALAR_KINDS,
    QuerySchema,
    dense_bounds,
)
from service.settings import ServiceSettings

# A categorical or hashed value: what `service.query._scalar_text` accepts.
_SCALAR: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "maxLength": MAX_TOKEN_CHARS},
        {"type": "integer"},
        {"type": "boolean"},
    ]
}


def feature_schema(
    kind: FeatureKind, max_history: int, bounds: tuple[float, float] | None = None
) -> dict[str, Any]:
    """The JSON schema of one inline query feature of `kind` (see `service.query`);
    `bounds` is a dense feature's accepted interval (`service.query.dense_bounds`).

    >>> feature_schema(FeatureKind.DENSE, 10, (-1.5, 2.0))
    {'anyOf': [{'type': 'number', 'minimum': -1.5, 'maximum': 2.0}, {'type': 'boolean'}, {'type': 'null'}]}
    """
    if kind in SCALAR_KINDS:
        return {"anyOf": [*copy.deepcopy(_SCALAR["anyOf"]), {"type": "null"}]}
    if kind in LIST_KINDS:
        items = {"anyOf": [*copy.deepcopy(_SCALAR["anyOf"]), {"type": "null"}]}
        return {
            "anyOf": [
                {"type": "array", "items": items, "maxItems": MAX_BAG_TOKENS},
                {"type": "null"},
            ]
        }
    if kind == FeatureKind.HISTORY:
        return {
            "anyOf": [
                {"type": "array", "items": copy.deepcopy(_SCALAR), "maxItems": max_history},
                {"type": "null"},
            ],
            "description": "Catalog item ids, most recent first.",
        }
    # dense: a JSON number in bounds (JSON has no NaN or infinity), a bool as 0/1, or null
    low, high = bounds if bounds is not None else dense_bounds(None)
    number = {"type": "number", "minimum": low, "maximum": high}
    return {"anyOf": [number, {"type": "boolean"}, {"type": "null"}]}


def query_object_schema(schema: QuerySchema, max_history: int) -> dict[str, Any]:
    """The ``query`` object of a request for the loaded model: its features and no others."""
    properties = {
        column: feature_schema(spec.kind, max_history, dense_bounds(schema.dense_stats.get(column)))
        for column, spec in schema.columns.items()
    }
    if schema.history_name is not None:
        properties[schema.history_name] = feature_schema(FeatureKind.HISTORY, max_history)
    return {"type": "object", "properties": properties, "additionalProperties": False}


_USER_ID: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": 256}
# A request needs inline features, a stored user, or both (`RetrievalEngine.prepare`).
_QUERY_OR_USER: dict[str, Any] = {
    "anyOf": [
        {"required": ["query"], "properties": {"query": {"type": "object"}}},
        {"required": ["user_id"], "properties": {"user_id": _USER_ID}},
    ]
}


def _describe_query(
    request: dict[str, Any], settings: ServiceSettings, schema: QuerySchema | None
) -> list[dict[str, Any]]:
    """Close `request`'s ``query`` property to the loaded model's features, in place; the
    cross-field rules every query-carrying request obeys."""
    if schema is not None:
        request["properties"]["query"]["anyOf"] = [
            query_object_schema(schema, settings.max_history),
            {"type": "null"},
        ]
    return [copy.deepcopy(_QUERY_OR_USER)]


def describe_requests(
    document: dict[str, Any], settings: ServiceSettings, schema: QuerySchema | None
) -> dict[str, Any]:
    """`document` (FastAPI's OpenAPI dict) with the service's request rules added, in place."""
    components = document.get("components", {}).get("schemas", {})
    request = components.get("RetrieveRequest")
    if request is not None:
        props = request["properties"]
        props["k"]["anyOf"] = [
            {"type": "integer", "minimum": 1, "maximum": settings.max_k},
            {"type": "null"},
        ]
        props["exclude_ids"]["maxItems"] = settings.max_exclude_ids
        request["allOf"] = [
            *_describe_query(request, settings, schema),
            {  # `exclude_seen` needs the user whose items it excludes
                "anyOf": [
                    {"properties": {"exclude_seen": {"const": False}}},
                    {"required": ["user_id"], "properties": {"user_id": dict(_USER_ID)}},
                ]
            },
        ]
    embed = components.get("EmbedRequest")
    if embed is not None:
        embed["allOf"] = _describe_query(embed, settings, schema)
    for name in ("BatchRetrieveRequest", "BatchEmbedRequest"):
        batch = components.get(name)
        if batch is not None:
            batch["properties"]["queries"]["maxItems"] = settings.max_batch_queries
    if settings.api_key is None:  # no key configured: /v1 is open, say so
        document.get("components", {}).pop("securitySchemes", None)
        for operations in document.get("paths", {}).values():
            for operation in operations.values():
                if isinstance(operation, dict):
                    operation.pop("security", None)
    return document


def install_openapi(app: FastAPI, settings: ServiceSettings) -> None:
    """Serve the described document at /openapi.json (see the module docstring)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = get_openapi(
            title=app.title,
            version=app.version,
            openapi_version=app.openapi_version,
            description=app.description,
            routes=app.routes,
        )
        services = getattr(app.state, "services", None)
        schema = services.schema if services is not None else None
        describe_requests(document, settings, schema)
        if schema is not None:  # complete: keep it
            app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]
