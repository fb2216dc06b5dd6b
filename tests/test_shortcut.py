"""The shortcut past the framework: a request the route would accept takes it, with
the route's own answer; any other goes the full way with its body as it came.

The application is driven as ASGI, its state on a real Redis; no worker runs,
so a request that takes the shortcut asks for an async answer (202, the job
queued), or names a model nobody serves (404).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from starlette.types import Message, Receive, Scope, Send

from app.main import build_state
from app.shortcut import Shortcut, work_routes
from hearth.settings import Settings
from tests.support import run_on_own_thread
from workers.protocol import Keys

MODEL = "all-minilm-l6-v2"
VALID = json.dumps({"model": MODEL, "input": ["one", "two"]}).encode()


class FullWay:
    """Stands for the rest of the application: records what reaches it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, bytes]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.calls.append((scope["method"], scope["path"], body))
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"full way"})


def call(
    settings: Settings,
    full_way: FullWay,
    body: bytes,
    path: str = "/v1/embeddings",
    method: str = "POST",
    headers: list[tuple[bytes, bytes]] | None = None,
    chunk: int = 0,
) -> tuple[int, dict[str, str], bytes]:
    """One request through the shortcut (the body in pieces of ``chunk`` bytes, if
    given); its status, headers and body."""
    state = build_state(settings)
    shortcut = Shortcut(full_way, state=state, routes=work_routes())
    if headers is None:
        headers = [(b"content-type", b"application/json"), (b"prefer", b"respond-async")]
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] if chunk else [body]
    pieces = pieces or [b""]
    scope: dict[str, Any] = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
        "scheme": "http",
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 1234),
        "root_path": "",
        "state": {},
    }
    sent: list[Message] = []

    async def receive() -> Message:
        piece = pieces.pop(0)
        return {"type": "http.request", "body": piece, "more_body": bool(pieces)}

    async def send(message: Message) -> None:
        sent.append(message)

    async def go() -> None:
        await shortcut(scope, receive, send)
        await state.close_connections()

    run_on_own_thread(go)
    start = next(message for message in sent if message["type"] == "http.response.start")
    answer = b"".join(message.get("body", b"") for message in sent[1:])
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, answer


@pytest.fixture
def settings(redis_url: str, namespace: str, tmp_path: Path) -> Settings:
    return Settings(redis_url=redis_url, namespace=namespace, state_dir=tmp_path)


def test_a_body_the_route_accepts_takes_the_shortcut(
    settings: Settings, redis_client: Redis, namespace: str
) -> None:
    full_way = FullWay()
    status, headers, body = call(settings, full_way, VALID, chunk=7)  # the body in pieces too
    assert full_way.calls == []
    assert status == 202, body
    job = json.loads(body)
    assert headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["model"] == MODEL
    record = redis_client.hgetall(Keys(namespace).job(job["id"]))
    assert record[b"status"] == b"queued"
    (entry,) = redis_client.xrange(Keys(namespace).stream(MODEL))
    queued = json.loads(entry[1][b"job"])
    assert queued["input"]["input"] == ["one", "two"]


def test_an_error_of_the_route_gets_its_envelope(settings: Settings) -> None:
    full_way = FullWay()
    unknown = json.dumps({"model": "no-such-model", "input": "hello"}).encode()
    status, _, body = call(settings, full_way, unknown)
    assert full_way.calls == []
    assert status == 404
    error = json.loads(body)["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    # Past validation, the route's own checks: an empty text.
    empty = json.dumps({"model": MODEL, "input": ["fine", ""]}).encode()
    status, _, body = call(settings, full_way, empty)
    assert status == 400
    assert json.loads(body)["error"]["param"] == "input[1]"


@pytest.mark.parametrize(
    ("body", "path", "method", "headers"),
    [
        (b'{"model": "all-minilm-l6-v2", "input": ', "/v1/embeddings", "POST", None),  # not JSON
        (b'{"model": "all-minilm-l6-v2"}', "/v1/embeddings", "POST", None),  # no input
        (b'{"model": "all-minilm-l6-v2", "input": [1, 2]}', "/v1/embeddings", "POST", None),
        (b'["all-minilm-l6-v2"]', "/v1/embeddings", "POST", None),  # not an object
        (b"\xff\xfe{", "/v1/embeddings", "POST", None),  # not text
        (b"[" * 100_000 + b"]" * 100_000, "/v1/embeddings", "POST", None),  # too deep
        (b"", "/v1/embeddings", "POST", None),
        (VALID, "/v1/embeddings", "POST", [(b"content-type", b"text/plain")]),
        (VALID, "/v1/embeddings", "POST", []),  # no content type
        (VALID, "/v1/embeddings", "PUT", None),
        (VALID, "/v1/embeddings/", "POST", None),
        (VALID, "/v1/images/edits", "POST", None),
        (VALID, "/v1/images/generations", "POST", None),  # an embeddings body: no prompt
    ],
)
def test_what_the_route_would_refuse_goes_the_full_way(
    settings: Settings,
    redis_client: Redis,
    namespace: str,
    body: bytes,
    path: str,
    method: str,
    headers: list[tuple[bytes, bytes]] | None,
) -> None:
    full_way = FullWay()
    status, _, answer = call(settings, full_way, body, path, method, headers, chunk=5)
    assert (status, answer) == (299, b"full way")
    assert full_way.calls == [(method, path, body)]  # the body as it came, whole
    assert redis_client.exists(Keys(namespace).stream(MODEL)) == 0


@pytest.mark.parametrize(
    "body",
    [
        b"\xef\xbb\xbf" + VALID,  # a byte order mark
        VALID.decode().encode("utf-16"),
        b'{"model": "all-minilm-l6-v2", "input": "x", "dimensions": NaN}',
    ],
    ids=["bom", "utf-16", "nan"],
)
def test_what_only_the_routes_parser_reads_goes_the_full_way(
    settings: Settings, body: bytes
) -> None:
    assert json.loads(body)  # the route reads it: its answer, whatever it is, is the one
    full_way = FullWay()
    status, _, answer = call(settings, full_way, body)
    assert (status, answer) == (299, b"full way")
    assert full_way.calls == [("POST", "/v1/embeddings", body)]


def test_content_types_the_route_reads_as_json(settings: Settings) -> None:
    for content_type in (
        b"application/json; charset=utf-8",
        b"Application/JSON",
        b"application/x+json",
    ):
        full_way = FullWay()
        headers = [(b"content-type", content_type), (b"prefer", b"respond-async")]
        status, _, _ = call(settings, full_way, VALID, headers=headers)
        assert (status, full_way.calls) == (202, []), content_type
