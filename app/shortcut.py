"""The short way through the application for the requests that do the work.

`POST /v1/embeddings` and `POST /v1/images/generations` carry most of a
deployment's traffic, and the framework's own work for such a request
(routing, per-request dependency resolution, body handling, the layers around
them) was a third of the API's CPU for it (0.17 of 0.50 ms per embedding
request under load, on a 2-core machine). ``Shortcut`` takes a request to
one of them from the middleware straight to its route's own ``prepare`` and
``respond``: the body validated by the same model, the same answer, the
errors turned into the same envelopes.

Only a request the route would accept takes it. Anything else goes the full
way, the body it read handed on as it came: a body that does not parse or
validate, another content type, a path or method of another route. So every
refusal of a malformed request is still the one the route documents.

The model reads the body with pydantic's own JSON parser, where the route
parses it with ``json.loads`` first: 58-60 µs instead of 85-88 for a lone
image request on a 2-core machine (traced). It reads no JSON that
``json.loads`` refuses, and reads the same values from what both read; what
only ``json.loads`` reads (a byte order mark, UTF-16, ``NaN``) goes the full
way, where the route reads it as it always did.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from fastapi import APIRouter
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from app import errors
from app.limits import replay
from app.routes import embeddings, images
from app.schemas import EmbeddingRequest, ImageGenerationRequest
from app.state import AppState
from app.submit import respond
from workers.protocol import Job

# A route's own preparation of a validated body: (body, state, deadline_s, reply_to) → Job.
Prepare = Callable[..., Job]


@dataclass(frozen=True)
class Short:
    """A route the shortcut may take: its body's model and its preparation."""

    route: APIRoute  # the full route, named on the request as the router names it
    body: type[BaseModel]
    prepare: Prepare


def _json_content(scope: Scope) -> bool:
    """Whether the request says its body is JSON, as the route tells (``application/json``,
    ``application/*+json``, with or without parameters)."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            media: bytes = value.split(b";", 1)[0].strip().lower()
            kind, _, subtype = media.partition(b"/")
            return kind == b"application" and (subtype == b"json" or subtype.endswith(b"+json"))
    return False


class Shortcut:
    """ASGI middleware, the innermost: see the module's docstring."""

    def __init__(self, app: ASGIApp, state: AppState, routes: dict[str, Short]) -> None:
        self.app = app
        self.state = state
        self.routes = routes  # by path; POST only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        short = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if short is None or scope["method"] != "POST" or not _json_content(scope):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body was in: nobody to answer
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        parameters = _validated(short.body, body)
        if parameters is None:
            await self.app(scope, replay(body, receive), send)
            return
        scope["route"] = short.route
        request = Request(scope, receive)
        try:
            prepare = partial(short.prepare, parameters, self.state)
            response = await respond(self.state, request, parameters, prepare)
        except errors.HANDLED as exc:  # as the application's handlers answer them
            response = await errors.handle(request, exc)
        await response(scope, receive, send)


def _validated(model: type[BaseModel], body: bytes) -> BaseModel | None:
    """``body`` as the route would take it, or None where the route would refuse it."""
    try:
        return model.model_validate_json(body)
    except ValueError:  # pydantic's ValidationError, for JSON it cannot read too
        return None


def _post_route(router: APIRouter, path: str) -> APIRoute:
    """The POST route of ``router`` at ``path``."""
    return next(
        route
        for route in router.routes
        if isinstance(route, APIRoute) and route.path == path and "POST" in (route.methods or ())
    )


def work_routes() -> dict[str, Short]:
    """The routes that take the shortcut, by path: the two that do the work."""
    return {
        "/v1/embeddings": Short(
            _post_route(embeddings.router, "/v1/embeddings"), EmbeddingRequest, embeddings.prepare
        ),
        "/v1/images/generations": Short(
            _post_route(images.router, "/v1/images/generations"),
            ImageGenerationRequest,
            images.prepare,
        ),
    }
