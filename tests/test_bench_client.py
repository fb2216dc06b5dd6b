"""The benchmarks' lean HTTP client (benchmarks/httpclient.py) against a real uvicorn server."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import uvicorn
import uvloop
from httpclient import Connection, Response, post_request
from starlette.types import Receive, Scope, Send

from tests.support import free_port, run_on_own_thread

HOST = "127.0.0.1"


@contextlib.contextmanager
def connection_to(port: int, **options: Any) -> Iterator[Connection]:
    """A benchmarks' Connection to the echo server, closed afterwards."""
    connection = Connection(HOST, port, **options)
    try:
        yield connection
    finally:
        connection.close()


Run = Callable[[Awaitable[Any]], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """Every test on both event loops: the load generators run the client on uvloop,
    which tells a protocol of its connection later than asyncio does."""
    runner: Run = uvloop.run if request.param == "uvloop" else asyncio.run  # type: ignore[assignment]
    return lambda awaitable: run_on_own_thread(lambda: awaitable, runner)


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
def server() -> Iterator[tuple[EchoApp, int]]:
    """The echo app under uvicorn, on a thread of its own."""
    app = EchoApp()
    port = free_port()
    config = uvicorn.Config(app, host=HOST, port=port, log_level="warning", lifespan="off")
    served = uvicorn.Server(config)
    thread = threading.Thread(target=served.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not served.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    yield app, port
    served.should_exit = True
    thread.join(10)


def request(port: int, path: str, body: bytes) -> bytes:
    return post_request(HOST, port, path, body)


def send_in_turn(run: Run, port: int, *sent: tuple[str, bytes]) -> list[Response]:
    """Each (path, body) POSTed in turn over one connection; the responses."""

    async def scenario() -> list[Response]:
        with connection_to(port) as connection:
            return [await connection.send(request(port, *each), 5.0) for each in sent]

    responses: list[Response] = run(scenario())
    return responses


def test_requests_share_one_kept_alive_connection(server: tuple[EchoApp, int], run: Run) -> None:
    app, port = server
    first, second = send_in_turn(run, port, ("/echo", b'{"n": 1}'), ("/echo", b'{"n": 22}'))
    assert (first.status, first.body) == (200, b'/echo {"n": 1}')
    assert (second.status, second.body) == (200, b'/echo {"n": 22}')
    assert len(app.clients) == 1


def test_a_closed_connection_is_opened_again(server: tuple[EchoApp, int], run: Run) -> None:
    app, port = server
    closing, after = send_in_turn(run, port, ("/close", b"{}"), ("/echo", b"{}"))
    assert closing.body == b"/close {}"
    assert (after.status, after.body) == (200, b"/echo {}")
    assert len(app.clients) == 2


def test_a_connection_idle_too_long_is_opened_again(server: tuple[EchoApp, int], run: Run) -> None:
    app, port = server

    async def scenario() -> list[Response]:
        with connection_to(port, idle_s=0.2) as connection:
            first = await connection.send(request(port, "/echo", b"1"), 5.0)
            soon = await connection.send(request(port, "/echo", b"2"), 5.0)
            await asyncio.sleep(0.3)
            late = await connection.send(request(port, "/echo", b"3"), 5.0)
            return [first, soon, late]

    responses = run(scenario())
    assert [r.body for r in responses] == [b"/echo 1", b"/echo 2", b"/echo 3"]
    assert len(app.clients) == 2  # the first two shared one connection, the third a new one


def test_the_status_comes_back_as_sent(server: tuple[EchoApp, int], run: Run) -> None:
    _, port = server
    (response,) = send_in_turn(run, port, ("/status/429", b"{}"))
    assert (response.status, response.body) == (429, b"/status/429 {}")


def test_a_timed_request_gives_its_milliseconds_and_refuses_any_answer_but_200(
    server: tuple[EchoApp, int], run: Run
) -> None:
    _, port = server

    async def scenario() -> float:
        with connection_to(port) as connection:
            ms = await connection.timed_ok(request(port, "/echo", b"{}"), 5.0)
            with pytest.raises(RuntimeError, match=r"HTTP 503: b'/status/503 {}'"):
                await connection.timed_ok(request(port, "/status/503", b"{}"), 5.0)
            return ms

    assert run(scenario()) > 0


def test_a_late_answer_never_answers_the_next_request(
    server: tuple[EchoApp, int], run: Run
) -> None:
    _, port = server

    async def scenario() -> Response:
        with connection_to(port) as connection:
            with pytest.raises(TimeoutError):
                await connection.send(request(port, "/slow", b"{}"), 0.2)
            return await connection.send(request(port, "/echo", b'"next"'), 5.0)

    response = run(scenario())
    assert response.body == b'/echo "next"'


def test_a_refused_connection_raises(run: Run) -> None:
    connection = Connection(HOST, free_port())
    with pytest.raises(OSError):
        run(connection.send(b"POST / HTTP/1.1\r\n\r\n", 5.0))
