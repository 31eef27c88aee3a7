"""A lean path for POST /v1/retrieve: the same answer without FastAPI's request machinery.

At a few hundred requests per second on two cores, FastAPI's generic per-request work
(routing, dependency resolution, body decoding with the standard `json`, validation
through its field wrappers, exception middlewares, response wrappers) costs about as
much CPU as the query tower and the encoding together. `RetrieveFastPath` is a pure ASGI
middleware that answers well-formed retrieval requests itself with the route's own
`service.routes.retrieve.retrieve_one` (admission limit, request deadline,
`RetrievalEngine.prepare` / `execute`, the orjson answer) and the error answers of
`service.errors`.

Everything else goes to the FastAPI app, which then answers as it always does: another
path or method, a content type other than JSON, a missing or wrong API key (refused
before by `service.middleware.APIKeyMiddleware`; checked here too, so this path never
answers without it), a body that is not a JSON object or does not validate as
`RetrieveRequest` (the 422 messages come from one place). A request is only handed over
before any work was done for it, with its body replayed. The OpenAPI document still
describes the route.

It sits innermost, inside the admission gate, the body limits, the API key check and the
metrics middleware, so those apply to both paths; the route label of its answers is
``/v1/retrieve``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import ServiceError, service_error_answer, unexpected_answer
from service.middleware import api_key_matches, replay_body
from service.routes.retrieve import retrieve_one
from service.schemas import RetrieveRequest

PATH = "/v1/retrieve"
_ROUTE = SimpleNamespace(path=PATH)  # what MetricsMiddleware reads for its route label


def _is_json(content_type: bytes) -> bool:
    return content_type.split(b";", 1)[0].strip().lower() == b"application/json"


class RetrieveFastPath:
    """Answer POST /v1/retrieve without FastAPI when the request is well-formed."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def _eligible(self, scope: Scope) -> Any:
        """The loaded `Services` when this request is one to answer here, else None."""
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            return None
        services = getattr(scope["app"].state, "services", None)
        if services is None:
            return None
        content_type, api_key = None, None
        for name, value in scope["headers"]:  # the first of each, as Starlette reads them
            if name == b"content-type" and content_type is None:
                content_type = value
            elif name == b"x-api-key" and api_key is None:
                api_key = value
        if content_type is None or not _is_json(content_type):
            return None
        if not api_key_matches(api_key, services.settings.api_key):
            return None
        return services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services = self._eligible(scope)
        if services is None:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:  # bounded: BodySizeLimitMiddleware has read and checked it already
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            raw = orjson.loads(body)
            request = RetrieveRequest.model_validate(raw) if isinstance(raw, dict) else None
        except (orjson.JSONDecodeError, ValidationError):
            request = None
        counts = scope["app"].state.fast_path
        if request is None:  # FastAPI answers (422 naming the field), from the same bytes
            counts["handed_over"] += 1
            await self.app(scope, replay_body(body, receive), send)
            return
        scope["route"] = _ROUTE
        answer = await self._answer(services, request, scope)
        counts["answered"] += 1
        await answer(scope, receive, send)

    async def _answer(self, services: Any, request: RetrieveRequest, scope: Scope) -> Any:
        """What `service.routes.retrieve.retrieve` answers, errors included."""
        try:
            return await retrieve_one(request, services.engine, services.limiter, services.settings)
        except ServiceError as exc:
            return service_error_answer(exc, scope["method"], scope["path"])
        except Exception:
            return unexpected_answer(scope["method"], scope["path"])
