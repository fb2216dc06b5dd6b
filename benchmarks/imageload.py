"""Image requests for the images benchmark: the same image in-process and through Hearth.

``request_body`` asks for what ``imagejob.image_input`` describes, so the raw
runner and the worker generate the same image for the same seed.
``alternating`` and ``closed_loop`` drive `POST /v1/images/generations`
through keep-alive connections (httpclient.py, the load generator's lean
client); ``job_phases`` splits Hearth's time per request using the job
records the API and worker wrote.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import redis
from httpclient import Connection, address, post_request
from imagejob import GUIDANCE, PROMPT
from pairs import primed_pairs

TIMEOUT_S = 120.0
PATH = "/v1/images/generations"


def request_body(model: str, size: int, steps: int, seed: int) -> dict[str, Any]:
    """The body of one `POST /v1/images/generations` for a ``size``-pixel square image."""
    return {
        "model": model,
        "prompt": PROMPT,
        "size": f"{size}x{size}",
        "num_inference_steps": steps,
        "guidance_scale": GUIDANCE,
        "seed": seed,
        "response_format": "b64_json",
    }


@dataclass(frozen=True)
class Sent:
    """One request through Hearth, timed by the client."""

    sent_at: float  # time.time() just before sending
    received_at: float  # time.time() once the whole answer was read
    ms: float  # the same span on the monotonic clock


class _Client:
    """One keep-alive connection to Hearth at ``url``."""

    def __init__(self, url: str) -> None:
        self.host, self.port, self.path = address(url, PATH)
        self.connection = Connection(self.host, self.port)

    async def post(self, body: dict[str, Any]) -> Sent:
        request = post_request(self.host, self.port, self.path, json.dumps(body).encode())
        sent_at = time.time()
        ms = await self.connection.timed_ok(request, TIMEOUT_S)
        return Sent(sent_at, time.time(), ms)

    def close(self) -> None:
        self.connection.close()


async def alternating(
    url: str,
    model: str,
    size: int,
    steps: int,
    seeds: list[int],
    warmup: int,
    raw: Callable[[int], float],
) -> tuple[list[float], list[Sent]]:
    """Each seed's image made by ``raw`` (in this process, returning its ms) and
    through Hearth, one request at a time, in pairs (``pairs.primed_pairs``):
    raw ms and Hearth's requests, in the order of ``seeds``. ``warmup`` pairs go
    first, unmeasured.
    """
    client = _Client(url)

    async def hearth(seed: int) -> Sent:
        return await client.post(request_body(model, size, steps, seed))

    try:
        await primed_pairs(range(warmup), hearth, raw)
        pairs = await primed_pairs(seeds, hearth, raw)
        return [raw_ms for _, raw_ms in pairs], [sent for sent, _ in pairs]
    finally:
        client.close()


async def closed_loop(
    url: str, model: str, size: int, steps: int, total: int, concurrency: int
) -> float:
    """Images per second of ``total`` requests from ``concurrency`` back-to-back clients.

    Every request has its own seed; size, steps and guidance are shared, so the
    worker may run concurrent requests in one pipeline call."""
    counter = itertools.count()

    async def client_loop(client: _Client) -> None:
        try:
            while (index := next(counter)) < total:
                await client.post(request_body(model, size, steps, 1000 + index))
        finally:
            client.close()

    started = time.perf_counter()
    await asyncio.gather(*(client_loop(_Client(url)) for _ in range(concurrency)))
    return total / (time.perf_counter() - started)


PHASES = (
    "API in: HTTP, validation",
    "queue → worker start",
    "worker run: pipeline, PNG",
    "store, reply, HTTP out",
)


def job_phases(client: redis.Redis, namespace: str, model: str, calls: list[Sent]) -> list[float]:
    """Mean ms per phase (see ``PHASES``) of ``calls``, sequential requests for ``model``.

    Each call's job is the record of ``model`` created while the call was out
    (between its send and its answer). Times come from the job record
    (``created_at`` in the API, ``started_at`` and ``finished_at`` in the
    worker) and from the client; all are this machine's wall clock.
    """
    keys = client.scan_iter(match=f"{namespace}:job:*")
    records = [cast(dict[bytes, bytes], client.hgetall(key)) for key in keys]
    of_model = [record for record in records if record[b"model"].decode() == model]
    totals = [0.0] * len(PHASES)
    for call in calls:
        mine = [
            record
            for record in of_model
            if call.sent_at <= float(record[b"created_at"]) <= call.received_at
        ]
        if len(mine) != 1:
            raise RuntimeError(f"found {len(mine)} job records for one request, not 1")
        created, started, finished = (
            float(mine[0][name]) for name in (b"created_at", b"started_at", b"finished_at")
        )
        marks = (call.sent_at, created, started, finished, call.received_at)
        for index in range(len(PHASES)):
            totals[index] += marks[index + 1] - marks[index]
    return [total / len(calls) * 1000 for total in totals]
