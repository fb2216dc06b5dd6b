"""One error tree, one table, one envelope.

::

    HearthError
    ├── InvalidRequest        400  a field is missing, malformed or out of range
    ├── Unauthorized          401  no or wrong API key
    ├── NotFound              404  unknown model, job or route
    ├── MethodNotAllowed      405  the route exists, not with this method
    ├── Conflict              409  the job already ended: nothing to cancel
    ├── PayloadTooLarge       413  the body is over the limit
    ├── Overloaded            429  queue full or rate-limited (with Retry-After)
    ├── InferenceFailed       500  the model raised while running the job
    ├── Unavailable           503  Redis unreachable, or no live worker holds the model
    └── DeadlineExceeded      504  a synchronous request ran past its deadline

Route handlers raise these; ``install`` turns them, and every lower-level
error that reaches the edge (validation, Redis, unknown model), into
OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException

from app.responses import JSONResponse
from app.schemas import JOB_TYPES
from models.registry import UnknownModelError

logger = logging.getLogger(__name__)


class HearthError(Exception):
    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


class InvalidRequest(HearthError): ...


class Unauthorized(HearthError): ...


class NotFound(HearthError): ...


class MethodNotAllowed(HearthError): ...


class Conflict(HearthError): ...


class PayloadTooLarge(HearthError): ...


class Overloaded(HearthError): ...


class InferenceFailed(HearthError): ...


class Unavailable(HearthError): ...


class DeadlineExceeded(HearthError): ...


# error class → (HTTP status, OpenAI error type)
ERROR_TABLE: dict[type[HearthError], tuple[int, str]] = {
    InvalidRequest: (400, "invalid_request_error"),
    Unauthorized: (401, "authentication_error"),
    NotFound: (404, "not_found_error"),
    MethodNotAllowed: (405, "invalid_request_error"),
    Conflict: (409, "invalid_request_error"),
    PayloadTooLarge: (413, "invalid_request_error"),
    Overloaded: (429, "rate_limit_error"),
    InferenceFailed: (500, "server_error"),
    Unavailable: (503, "service_unavailable"),
    DeadlineExceeded: (504, "timeout"),
}


def _param(loc: tuple[int | str, ...]) -> str | None:
    """('body', 'input', 3) → 'input[3]'."""
    parts = [part for part in loc if part not in ("body", "query", "path", "header")]
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or None


def from_validation(exc: RequestValidationError) -> InvalidRequest:
    first: dict[str, Any] = exc.errors()[0]
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "parse error")
        return InvalidRequest(f"The request body is not valid JSON: {reason}", code="invalid_json")
    loc = tuple(first.get("loc", ()))
    if first.get("type") in ("union_tag_invalid", "union_tag_not_found"):
        return InvalidRequest(
            f"Invalid 'type': {first.get('msg')}", param="type", code="invalid_value"
        )
    if len(loc) > 1 and loc[1] in JOB_TYPES:
        loc = (loc[0], *loc[2:])  # the tag pydantic adds for a queued job's type
    param = _param(loc)
    if param is None:
        return InvalidRequest("The request body must be a JSON object.", code="invalid_body")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return InvalidRequest(f"Invalid '{param}': {message}", param=param, code="invalid_value")


def translate(exc: Exception) -> HearthError:
    """Map any exception reaching the edge to Hearth's tree: the one place this happens."""
    if isinstance(exc, HearthError):
        return exc
    if isinstance(exc, RequestValidationError):
        return from_validation(exc)
    if isinstance(exc, UnknownModelError):
        return NotFound(
            f"The model '{exc.model_id}' does not exist; GET /v1/models lists the models served.",
            param="model",
            code="model_not_found",
        )
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        return Unavailable(
            "The job queue (Redis) is unreachable; retry shortly.", code="queue_unavailable"
        )
    if isinstance(exc, HTTPException):
        if exc.status_code == 404:
            return NotFound("No such route.", code="route_not_found")
        if exc.status_code == 405:
            return MethodNotAllowed("Method not allowed on this route.", code="method_not_allowed")
        if exc.status_code == 413:
            return PayloadTooLarge(str(exc.detail), code="body_too_large")
        return InvalidRequest(str(exc.detail))
    logger.error("unhandled error", exc_info=exc)
    return InferenceFailed("Internal error; it has been logged.", code="internal_error")


def response_for(error: HearthError) -> JSONResponse:
    status, kind = ERROR_TABLE[type(error)]
    body = {
        "error": {"message": error.message, "type": kind, "param": error.param, "code": error.code}
    }
    return JSONResponse(body, status_code=status, headers=error.headers)


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    return response_for(translate(exc))


def install(app: FastAPI) -> None:
    for kind in (
        HearthError,
        RequestValidationError,
        HTTPException,
        UnknownModelError,
        RedisConnectionError,
        RedisTimeoutError,
        Exception,
    ):
        app.add_exception_handler(kind, _handle)
