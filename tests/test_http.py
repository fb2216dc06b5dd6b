"""The API's HTTP protocol: a response's head goes out with its body."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from hearth.http import HeldHead, HttpProtocol
from tests.support import free_port, run_on_own_thread

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n"


class Recording:
    """A transport that keeps what is written to it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


def held(test: Any) -> None:
    async def run() -> None:
        transport = Recording()
        await test(HeldHead(transport, asyncio.get_running_loop()), transport)  # type: ignore[arg-type]

    run_on_own_thread(run)


def test_a_head_goes_out_with_the_body_written_after_it() -> None:
    async def test(head: HeldHead, transport: Recording) -> None:
        head.write(HEAD)
        assert transport.writes == []
        head.write(b"body")
        assert transport.writes == [HEAD + b"body"]
        await asyncio.sleep(0)  # the turn's end finds nothing held
        assert transport.writes == [HEAD + b"body"]

    held(test)


def test_a_head_alone_goes_out_at_the_end_of_the_turn() -> None:
    async def test(head: HeldHead, transport: Recording) -> None:
        head.write(HEAD)
        await asyncio.sleep(0)
        assert transport.writes == [HEAD]
        head.write(b"body")
        assert transport.writes == [HEAD, b"body"]

    held(test)


def test_other_writes_are_not_held_and_close_writes_a_held_head_first() -> None:
    async def test(head: HeldHead, transport: Recording) -> None:
        head.write(b"3\r\nabc\r\n")
        assert transport.writes == [b"3\r\nabc\r\n"]
        head.write(HEAD)
        head.close()
        assert transport.writes == [b"3\r\nabc\r\n", HEAD]
        assert transport.closed
        assert head.get_extra_info("peername") == ("127.0.0.1", 1)  # the transport's own

    held(test)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """A whole body at /whole, two chunks a moment apart anywhere else."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/whole":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"whole"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"first ", "more_body": True})
    await asyncio.sleep(0.05)
    await send({"type": "http.response.body", "body": b"second"})


@pytest.fixture
def server() -> Iterator[str]:
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http=HttpProtocol, log_config=None, lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            threading.Event().wait(0.025)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_responses_through_the_protocol_arrive_whole(server: str) -> None:
    with httpx.Client(base_url=server) as client:  # one keep-alive connection
        for _ in range(3):
            assert client.get("/whole").content == b"whole"
            streamed = client.get("/streamed")
            assert streamed.content == b"first second"
            assert streamed.headers["transfer-encoding"] == "chunked"
