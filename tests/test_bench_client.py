"""The benchmarks' lean HTTP client (benchmarks/httpclient.py) against a real uvicorn server."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from tests.support import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from httpclient import Connection, post_request

HOST = "127.0.0.1"


class EchoApp:
    """Answers a POST with its body, as `/status/N` with status N, and `/close`
    with `Connection: close`; `/slow` waits a second first. Counts the client
    connections it has seen."""

    def __init__(self) -> None:
        self.clients: set[tuple[str, int]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.clients.add(scope["client"])
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        path: str = scope["path"]
        status = int(path.rsplit("/", 1)[1]) if path.startswith("/status/") else 200
        headers = [(b"content-type", b"application/json")]
        if path == "/close":
            headers.append((b"connection", b"close"))
        if path == "/slow":
            await asyncio.sleep(1.0)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": path.encode() + b" " + body})


@pytest.fixture
async def server() -> AsyncIterator[tuple[EchoApp, int]]:
    app = EchoApp()
    port = free_port()
    config = uvicorn.Config(app, host=HOST, port=port, log_level="warning", lifespan="off")
    served = uvicorn.Server(config)
    task = asyncio.create_task(served.serve())
    while not served.started:
        await asyncio.sleep(0.01)
    yield app, port
    served.should_exit = True
    await task


def request(port: int, path: str, body: bytes) -> bytes:
    return post_request(HOST, port, path, body)


async def test_requests_share_one_kept_alive_connection(server: tuple[EchoApp, int]) -> None:
    app, port = server
    connection = Connection(HOST, port)
    try:
        first = await connection.send(request(port, "/echo", b'{"n": 1}'), 5.0)
        second = await connection.send(request(port, "/echo", b'{"n": 22}'), 5.0)
    finally:
        connection.close()
    assert (first.status, first.body) == (200, b'/echo {"n": 1}')
    assert (second.status, second.body) == (200, b'/echo {"n": 22}')
    assert len(app.clients) == 1


async def test_a_closed_connection_is_opened_again(server: tuple[EchoApp, int]) -> None:
    app, port = server
    connection = Connection(HOST, port)
    try:
        closing = await connection.send(request(port, "/close", b"{}"), 5.0)
        after = await connection.send(request(port, "/echo", b"{}"), 5.0)
    finally:
        connection.close()
    assert closing.body == b"/close {}"
    assert (after.status, after.body) == (200, b"/echo {}")
    assert len(app.clients) == 2


async def test_the_status_comes_back_as_sent(server: tuple[EchoApp, int]) -> None:
    _, port = server
    connection = Connection(HOST, port)
    try:
        response = await connection.send(request(port, "/status/429", b"{}"), 5.0)
    finally:
        connection.close()
    assert (response.status, response.body) == (429, b"/status/429 {}")


async def test_a_late_answer_never_answers_the_next_request(server: tuple[EchoApp, int]) -> None:
    _, port = server
    connection = Connection(HOST, port)
    try:
        with pytest.raises(TimeoutError):
            await connection.send(request(port, "/slow", b"{}"), 0.2)
        response = await connection.send(request(port, "/echo", b'"next"'), 5.0)
    finally:
        connection.close()
    assert response.body == b'/echo "next"'


async def test_a_refused_connection_raises() -> None:
    connection = Connection(HOST, free_port())
    with pytest.raises(OSError):
        await connection.send(b"POST / HTTP/1.1\r\n\r\n", 5.0)
