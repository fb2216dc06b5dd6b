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
from starlette.routing import Match

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


BODY_NOT_PARSED = "There was an error parsing the body"  # FastAPI's words
LOCATIONS = ("body", "query", "path", "header", "cookie")  # FastAPI's first loc element


def _param(loc: tuple[int | str, ...]) -> str | None:
    """('body', 'input', 3) → 'input[3]'. Only the first element can be a location:
    deeper, 'body' is a field of that name."""
    parts = loc[1:] if loc and loc[0] in LOCATIONS else loc
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
    if param is None and first.get("type") == "string_unicode":  # a field's name, not its value
        name = ascii(first.get("input"))
        return InvalidRequest(
            f"A field name in the request body is not valid Unicode: {name}.",
            code="invalid_value",
        )
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
            # Its Allow header is set by the handler, which can see every route.
            return MethodNotAllowed("Method not allowed on this route.", code="method_not_allowed")
        if exc.status_code == 413:
            return PayloadTooLarge(str(exc.detail), code="body_too_large")
        if exc.status_code == 400 and exc.detail == BODY_NOT_PARSED:
            # Bytes that are not UTF-8, or JSON nested deeper than the parser goes.
            reason = exc.__cause__ or "unreadable"
            return InvalidRequest(
                f"The request body is not valid JSON: {reason}", code="invalid_json"
            )
        return InvalidRequest(str(exc.detail))
    logger.error("unhandled error", exc_info=exc)
    return InferenceFailed("Internal error; it has been logged.", code="internal_error")


def within(field: str, error: HearthError) -> HearthError:
    """``error``, raised about a body that sits in ``field`` of the request's body,
    naming its field as seen from there: 'dimensions' → 'input.dimensions'."""
    if error.param is None:
        return error
    param = f"{field}.{error.param}"
    message = error.message.replace(f"Invalid '{error.param}'", f"Invalid '{param}'", 1)
    return type(error)(message, param=param, code=error.code, headers=error.headers)


def _encodable(text: str | None) -> str | None:
    # An error may quote what the client sent; a lone surrogate in it would
    # make the envelope itself unencodable. Such characters are spelled out.
    if text is None or text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def envelope(error: HearthError) -> dict[str, Any]:
    """``error`` in OpenAI's envelope: the body of its response, and the data of
    the ``error`` event that ends a job's event stream early."""
    _, kind = ERROR_TABLE[type(error)]
    detail = {"message": error.message, "type": kind, "param": error.param, "code": error.code}
    return {"error": {key: _encodable(value) for key, value in detail.items()}}


def response_for(error: HearthError) -> JSONResponse:
    status, _ = ERROR_TABLE[type(error)]
    return JSONResponse(envelope(error), status_code=status, headers=error.headers)


METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed(request: Request) -> dict[str, str]:
    """The Allow header of a 405: every method some route at this path takes.
    (Starlette's own names those of the first such route only.)"""
    routes = request.app.router.routes
    allowed = [
        method
        for method in METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    ]
    return {"Allow": ", ".join(allowed)}


# What the application answers in its envelope, as the client's fault or the
# queue's; anything else is answered 500 by the outermost handler, then re-raised.
HANDLED = (
    HearthError,
    RequestValidationError,
    HTTPException,
    UnknownModelError,
    RedisConnectionError,
    RedisTimeoutError,
)


async def handle(request: Request, exc: Exception) -> JSONResponse:
    """The answer to ``exc``, raised while handling ``request``."""
    error = translate(exc)
    if isinstance(error, MethodNotAllowed):
        error.headers = _allowed(request)
    return response_for(error)


def install(app: FastAPI) -> None:
    for kind in (*HANDLED, Exception):
        app.add_exception_handler(kind, handle)
