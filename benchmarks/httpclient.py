"""A lean keep-alive HTTP/1.1 client for the benchmarks' load generators.

The clients share the machine's two cores with the service they measure, so
whatever they spend per request is taken from the service, and their own
latency is counted as the service's. One ``Connection`` is one TCP connection
with one request in flight at a time, as a closed-loop client needs: the
request goes out as bytes prepared before the load starts, and the response is
parsed by httptools (the C parser uvicorn serves with). Alternated with
aiohttp against the same Hearth, it spent half the CPU per request (0.46
against 0.93 ms at concurrency 1, 0.11 against 0.22 ms at 32), and a quarter
less again on uvloop's event loop (0.34 ms at concurrency 1), which the load
generators run it on.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes


def address(url: str, path: str) -> tuple[str, int, str]:
    """Host, port and request path of ``path`` under the base ``url``."""
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80, f"{parts.path.rstrip('/')}{path}"


def post_request(host: str, port: int, path: str, body: bytes) -> bytes:
    """The bytes of a ``POST`` of a JSON ``body``, ready to send again and again."""
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Content-Type: application/json\r\n"
        "Accept: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    return head.encode("latin-1") + body


class _Protocol(asyncio.Protocol):
    """Feeds what arrives to the parser; resolves the waiting request's future."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Response] | None = None
        self.chunks: list[bytes] = []
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"unreadable response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(exc or ConnectionError("the server closed the connection"))

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        response = Response(self.parser.get_status_code(), b"".join(self.chunks))
        self.chunks = []
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(response)

    def _fail(self, exc: BaseException) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)


# A connection left idle this long is opened anew before the next request: the
# server may be closing it (uvicorn's keep-alive timeout is 5 s), and a request
# written while it closes gets no answer.
IDLE_S = 4.0


class Connection:
    """One keep-alive connection to ``host:port``, reopened when the server closes
    it or it sat idle ``idle_s``."""

    def __init__(self, host: str, port: int, idle_s: float = IDLE_S) -> None:
        self.host = host
        self.port = port
        self.idle_s = idle_s
        self._protocol: _Protocol | None = None
        self._last_used = float("-inf")  # time.monotonic() of the last answer

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_connection(_Protocol, self.host, self.port)
        # uvloop calls connection_made a moment later, asyncio before returning.
        protocol.connection_made(transport)
        return protocol

    async def send(self, request: bytes, timeout_s: float) -> Response:
        """Send a prepared request (see ``post_request``) and wait for its whole response."""
        protocol = self._protocol
        if (
            protocol is None
            or protocol.transport is None
            or not protocol.keep_alive
            or time.monotonic() - self._last_used > self.idle_s
        ):
            self.close()
            protocol = self._protocol = await self._open()
        assert protocol.transport is not None
        protocol.waiter = asyncio.get_running_loop().create_future()
        protocol.transport.write(request)
        try:
            async with asyncio.timeout(timeout_s):
                response = await protocol.waiter
        except BaseException:
            self.close()  # a response may still arrive: this connection is not reused
            raise
        self._last_used = time.monotonic()
        return response

    async def timed_ok(self, request: bytes, timeout_s: float) -> float:
        """Milliseconds of one ``send`` of a request that must be answered 200: any
        other answer raises, with the start of its body."""
        started = time.perf_counter()
        response = await self.send(request, timeout_s)
        ms = (time.perf_counter() - started) * 1000
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.body[:300]!r}")
        return ms

    def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None
