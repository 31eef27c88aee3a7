"""One error hierarchy for the service, mapped to HTTP answers in one place.

Every error a handler raises on purpose is a `ServiceError`; `install_error_handlers`
turns it into ``{"error": {"code": ..., "message": ..., "field": ...}}`` with its status
code (and ``Retry-After`` for overload and unavailability). Request validation errors
become 422 with the offending field named; anything else becomes a bare 500. No answer
ever carries a traceback or an exception's internals.

==========================  ======  ==========================================
error                       status  when
==========================  ======  ==========================================
`InvalidRequestError`       422     bad input (unknown feature, wrong type, k)
`UnknownUserError`          404     `user_id` not in the feature store
`UnauthorizedError`         401     missing or wrong `X-API-Key`
`PayloadTooLargeError`      413     body over `max_body_bytes`
`OverloadedError`           429     too many requests in flight (Retry-After)
`NotReadyError`             503     model or index not loaded, or draining
`DependencyError`           503     Redis (feature store) unavailable (Retry-After)
`DeadlineExceededError`     504     the request ran past `request_timeout_s`
`QueryEmbeddingError`       500     the query tower gave a non-finite embedding
`SearchResultError`         500     the index answered a query with invalid rows
`FeatureStoreCorruptError`  500     a stored user record is unreadable or invalid
`BodyTimeoutError`          408     the body took over `body_timeout_s` to arrive
==========================  ======  ==========================================

Example:
    >>> err = InvalidRequestError("`k` must be in [1, 2048]; got 0", field="k")
    >>> err.status_code, err.body()
    (422, {'error': {'code': 'invalid_request', 'message': '`k` must be in [1, 2048]; got 0', 'field': 'k'}})
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

logger = logging.getLogger(__name__)

_MAX_ECHO = 80  # characters of a bad input value quoted back in a 422 message


class ServiceError(Exception):
    """An error with a fixed HTTP status and a message that is safe to show to clients.

    Args:
        message: what went wrong, naming the argument and the bad value.
        field: the request field at fault (dotted path), when there is one.
        retry_after_s: seconds for the ``Retry-After`` header (429/503 errors).
    """

    status_code = 500
    code = "internal_error"

    def __init__(
        self, message: str, *, field: str | None = None, retry_after_s: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s else {}


class InvalidRequestError(ServiceError):
    """The request is well-formed JSON but its content is wrong (422)."""

    status_code = 422
    code = "invalid_request"


class UnknownUserError(ServiceError):
    """`user_id` is not in the feature store (404)."""

    status_code = 404
    code = "unknown_user"


class UnauthorizedError(ServiceError):
    """Missing or wrong API key (401); the message never says which."""

    status_code = 401
    code = "unauthorized"


class PayloadTooLargeError(ServiceError):
    """The body is larger than `max_body_bytes` (413)."""

    status_code = 413
    code = "payload_too_large"


class OverloadedError(ServiceError):
    """Too many requests in flight; retry later (429 + Retry-After)."""

    status_code = 429
    code = "overloaded"


class NotReadyError(ServiceError):
    """Model or index not loaded yet, or the service is shutting down (503 + Retry-After)."""

    status_code = 503
    code = "not_ready"


class DependencyError(ServiceError):
    """A backing service (Redis feature store) failed or is unreachable (503 + Retry-After)."""

    status_code = 503
    code = "dependency_unavailable"


class DeadlineExceededError(ServiceError):
    """The request did not finish within `request_timeout_s` (504)."""

    status_code = 504
    code = "deadline_exceeded"


class QueryEmbeddingError(ServiceError):
    """The query tower gave this query a non-finite embedding (500); the other queries of
    its micro-batch are answered as usual."""

    status_code = 500
    code = "embedding_failed"


class SearchResultError(ServiceError):
    """The index answered this query with rows outside the catalog or non-finite scores
    (500); the other queries of its micro-batch are answered as usual."""

    status_code = 500
    code = "search_failed"


class BodyTimeoutError(ServiceError):
    """The request body did not arrive within `body_timeout_s` of its headers (408; the
    connection is closed)."""

    status_code = 408
    code = "body_timeout"


class FeatureStoreCorruptError(ServiceError):
    """A user record in the feature store is not what `retrieval features push` writes
    (not JSON, wrong types, values the query checks refuse): the stored data is at fault,
    never the request (500; the message names the key)."""

    status_code = 500
    code = "feature_store_corrupt"


def error_response(error: ServiceError) -> Response:
    """The JSON answer of a `ServiceError` (also used by the ASGI middlewares)."""
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers())


def error_bytes(error: ServiceError) -> bytes:
    return json.dumps(error.body()).encode()


def _echo(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_ECHO else text[: _MAX_ECHO - 3] + "..."


def describe_validation_error(exc: RequestValidationError) -> InvalidRequestError:
    """The first pydantic error of a request as one message naming its field."""
    errors = exc.errors()
    if not errors:
        return InvalidRequestError("invalid request")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = ".".join(loc) or "body"
    message = str(first.get("msg", "invalid value"))
    if first.get("type") == "json_invalid":
        return InvalidRequestError(f"request body is not valid JSON: {message}", field="body")
    if "input" in first and first.get("type") != "missing":
        message = f"{message}; got {_echo(first['input'])}"
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return InvalidRequestError(f"`{field}`: {message}{more}", field=field)


def service_error_answer(exc: ServiceError, method: str, path: str) -> Response:
    """The answer of a `ServiceError` raised while handling `method path` (5xx logged)."""
    if exc.status_code >= 500:
        logger.warning("%s %s -> %d: %s", method, path, exc.status_code, exc)
    return error_response(exc)


def unexpected_answer(method: str, path: str) -> Response:
    """The bare 500 of an unexpected exception (call from an ``except`` block: logged with
    its traceback, which never reaches the answer)."""
    logger.exception("unhandled error on %s %s", method, path)
    return JSONResponse(
        {"error": {"code": "internal_error", "message": "internal server error"}},
        status_code=500,
    )


def install_error_handlers(app: FastAPI) -> None:
    """Map every error to its HTTP answer (the one place where this happens, for the
    FastAPI routes and the plain Starlette route of /v1/retrieve alike)."""

    async def on_service_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        return service_error_answer(exc, request.method, request.url.path)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(describe_validation_error(exc))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400:  # FastAPI could not decode the body (e.g. not UTF-8)
            return error_response(
                InvalidRequestError(f"request body is not valid JSON: {exc.detail}", field="body")
            )
        error = ServiceError(str(exc.detail))
        error.status_code = exc.status_code
        error.code = {404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error"
        )
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        return unexpected_answer(request.method, request.url.path)

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
