"""Closed-loop load generator for an OpenAI-style embeddings endpoint, run in its own process.

``concurrency`` tasks on uvloop, each with a keep-alive connection of its own
(httpclient.py: little CPU per request, which matters when the client shares
the machine's cores with the service it measures), send requests back to back
for ``warmup`` then ``duration`` seconds to ``POST {url}{path}`` (Hearth's
``/v1/embeddings`` by default; infinity-emb serves ``/embeddings``). A
request's ``input`` is one sentence when ``inputs`` is 1, else a list of
``inputs`` sentences, taken in turn from benchmarks/sentences.py. Every
distinct request is encoded once, before the load starts, and the ready bytes
are cycled through.
Only requests that complete inside the measured window (after the warmup,
before its end) count. Prints one JSON line:

    {"concurrency", "inputs", "requests", "errors", "rps", "inputs_per_s",
     "p50_ms", "p90_ms", "p99_ms", "error_sample", "completed", "cpu_s"}

``requests`` counts every request completed in the window, ``errors`` those
that got a non-200 status or raised; ``rps``, ``inputs_per_s`` (``rps`` times
``inputs``) and the latency percentiles are over the successful ones.
``completed`` counts the requests of the whole run, warmup included, and
``cpu_s`` is the CPU time this process spent sending them: with the server's
own CPU time over the same run, what each request cost every process.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import uvloop
from httpclient import Connection, address, post_request
from sentences import SENTENCES


@dataclass(frozen=True)
class Record:
    done_at: float  # perf_counter when the response (or the error) came back
    latency_s: float
    error: str | None


def request_bodies(model: str, inputs: int) -> list[bytes]:
    """Every distinct request body, encoded, in the order they are sent.

    Request ``k`` carries sentences ``k * inputs`` to ``k * inputs + inputs - 1``
    (modulo the number of sentences): a plain string when ``inputs`` is 1, else a
    list. The sequence repeats after ``len(SENTENCES) / gcd(inputs, len(SENTENCES))``
    requests, so that many bodies cover it."""
    if inputs < 1:
        raise ValueError(f"inputs must be at least 1, not {inputs}")
    count = len(SENTENCES) // math.gcd(inputs, len(SENTENCES))
    bodies: list[bytes] = []
    for k in range(count):
        texts = [SENTENCES[(k * inputs + i) % len(SENTENCES)] for i in range(inputs)]
        payload = {"model": model, "input": texts[0] if inputs == 1 else texts}
        bodies.append(json.dumps(payload).encode())
    return bodies


async def _client_loop(
    connection: Connection,
    requests: Iterator[bytes],
    stop_at: float,
    timeout_s: float,
    records: list[Record],
) -> None:
    """Send requests back to back until ``stop_at``, appending one record each."""
    try:
        while time.perf_counter() < stop_at:
            request = next(requests)
            started = time.perf_counter()
            error: str | None = None
            try:
                response = await connection.send(request, timeout_s)
                if response.status != 200:
                    error = f"HTTP {response.status}: {response.body[:200]!r}"
            except (OSError, TimeoutError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            done = time.perf_counter()
            records.append(Record(done, done - started, error))
    finally:
        connection.close()


def summarize(
    records: list[Record],
    concurrency: int,
    window_start: float,
    window_end: float,
    inputs: int = 1,
) -> dict[str, Any]:
    """Counts, throughput and latency percentiles of the records completed in the window."""
    counted = [r for r in records if window_start <= r.done_at <= window_end]
    ok = np.array([r.latency_s for r in counted if r.error is None], dtype=np.float64) * 1000
    errors = [r.error for r in counted if r.error is not None]
    p50, p90, p99 = np.percentile(ok, [50, 90, 99]) if ok.size else (float("nan"),) * 3
    window = window_end - window_start
    return {
        "concurrency": concurrency,
        "inputs": inputs,
        "requests": len(counted),
        "errors": len(errors),
        "rps": ok.size / window,
        "inputs_per_s": ok.size * inputs / window,
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "error_sample": errors[0] if errors else None,
    }


async def generate(
    url: str,
    model: str,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    timeout_s: float,
    path: str = "/v1/embeddings",
    inputs: int = 1,
) -> dict[str, Any]:
    """Run the closed loop against ``url`` + ``path`` and return its summary."""
    records: list[Record] = []
    host, port, endpoint = address(url, path)
    prepared = [post_request(host, port, endpoint, body) for body in request_bodies(model, inputs)]
    requests = itertools.cycle(prepared)  # shared by every task
    cpu_started = time.process_time()
    start = time.perf_counter()
    window_start = start + warmup_s
    window_end = window_start + duration_s
    tasks = [
        asyncio.create_task(
            _client_loop(Connection(host, port), requests, window_end, timeout_s, records)
        )
        for _ in range(concurrency)
    ]
    await asyncio.gather(*tasks)
    summary = summarize(records, concurrency, window_start, window_end, inputs)
    summary["completed"] = len(records)
    summary["cpu_s"] = time.process_time() - cpu_started
    return summary


def main() -> None:
    """Parse the options, run the load, print the JSON summary line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url", required=True, help="the service's base URL, e.g. http://127.0.0.1:8000"
    )
    parser.add_argument("--path", default="/v1/embeddings", help="endpoint path appended to --url")
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument(
        "--inputs", type=int, default=1, help="sentences per request (1: a string, else a list)"
    )
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds not measured")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, s")
    args = parser.parse_args()
    if args.inputs < 1:
        parser.error("--inputs must be at least 1")
    summary = uvloop.run(
        generate(
            args.url,
            args.model,
            args.concurrency,
            args.warmup,
            args.duration,
            args.timeout,
            path=args.path,
            inputs=args.inputs,
        )
    )
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
