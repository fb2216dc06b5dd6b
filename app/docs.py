"""The docs pages (`/docs`, `/redoc`) stay local, and the document they show
lists the error answers Hearth gives.

Their scripts are served by Hearth itself (fastapi-offline); ReDoc's bundle
still links a logo on its CDN, so the two pages carry a Content-Security-Policy
that lets them load nothing from anywhere else.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

DOCS_PATHS = ("/docs", "/redoc")
POLICY = (
    b"default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    b"script-src 'self' 'unsafe-inline'; worker-src 'self' blob:; font-src 'self' data:"
)


class DocsPolicy:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in DOCS_PATHS:
            await self.app(scope, receive, send)
            return

        async def send_with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"content-security-policy", POLICY)]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_policy)


def _error(description: str) -> dict[str, Any]:
    schema = {"$ref": "#/components/schemas/ErrorBody"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def document_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """Make the OpenAPI document list the errors Hearth answers, and only those.

    FastAPI lists a 422 with its own validation body on every route that takes
    input; Hearth answers bad input with 400 and its error envelope instead.
    Every `/v1` route may also answer 401 (API keys), 429 (rate limit, full
    queue) and 503 (Redis unreachable); every route with a body (they all take
    work) 400, 409 (an `Idempotency-Key` sent with another request, or whose
    job has expired) and 413.
    """
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            if path.startswith("/v1/"):
                responses.setdefault("401", _error("Missing or wrong API key (when keys are set)."))
                responses.setdefault(
                    "429",
                    _error("Rate limit reached, or the model's queue is full: see Retry-After."),
                )
                responses.setdefault(
                    "503", _error("Redis unreachable, or no worker for the model.")
                )
            if "requestBody" in operation:
                responses.setdefault("400", _error("Invalid request: `param` names the field."))
                responses.setdefault(
                    "409",
                    _error(
                        "The Idempotency-Key came with another request, or its job has expired."
                    ),
                )
                responses.setdefault("413", _error("Body larger than HEARTH_MAX_BODY_BYTES."))
    if "#/components/schemas/HTTPValidationError" not in json.dumps(schema["paths"]):
        schemas = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):  # the second serves the first
            schemas.pop(name, None)
    return schema
