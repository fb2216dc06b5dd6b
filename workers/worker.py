"""The worker process: load once, then take batches from Redis and run them.

Life cycle:
1. ``setup``: choose device and dtype, load every model it serves (warm), make
   sure each model's stream has the consumer group.
2. loop: read up to ``HEARTH_MAX_BATCH_JOBS`` entries across the streams
   (``XREADGROUP``), then per model: start the jobs (skipping cancelled and
   expired ones), run them as one batch, store each outcome, acknowledge.
3. heartbeat: every ``HEARTH_HEARTBEAT_S`` the worker tells Redis which models
   it holds; the API uses that for readiness and routing.
4. on SIGTERM or SIGINT it stops reading, finishes the batch it holds, exits.

A job is acknowledged only after its outcome is stored. One batch runs at a
time, on one inference thread: pipelines are never shared between threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, cast

import orjson
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from hearth.settings import Settings
from models.device import Placement, choose_placement
from models.registry import ModelKind, ModelSpec
from workers.protocol import (
    CONSUMER_GROUP,
    FINISH_SCRIPT,
    START_SCRIPT,
    Job,
    JobError,
    JobStatus,
    Keys,
    Outcome,
    reply_message,
)

logger = logging.getLogger(__name__)

Entries = list[tuple[bytes, dict[bytes, bytes]]]  # stream entries as XREADGROUP returns them

READ_BLOCK_MS = 1000
RETRY_PAUSE_S = 1.0


class Runner(Protocol):
    def run(self, jobs: list[Job]) -> tuple[list[Outcome], list[int]]: ...


def load_runner(spec: ModelSpec, placement: Placement, settings: Settings) -> Runner:
    if spec.kind is ModelKind.EMBEDDING:
        from models.embedding import EmbeddingModel
        from workers.embeddings import EmbeddingRunner

        return EmbeddingRunner(
            spec.id, EmbeddingModel(spec.path, placement, settings.max_batch_tokens)
        )
    raise ValueError(f"model {spec.id}: kind {spec.kind} has no runner")


def run_guarded(runner: Runner, jobs: list[Job]) -> tuple[list[Outcome], list[int]]:
    """Run a batch; if it raises, run its jobs one by one so only the job at
    fault fails and the others still get their result."""
    try:
        return runner.run(jobs)
    except Exception as exc:
        if len(jobs) == 1:
            logger.exception("job %s failed", jobs[0].id)
            return [Outcome(JobStatus.FAILED, error=JobError(f"inference failed: {exc}"))], []
    outcomes: list[Outcome] = []
    sizes: list[int] = []
    for job in jobs:
        job_outcomes, job_sizes = run_guarded(runner, [job])
        outcomes += job_outcomes
        sizes += job_sizes
    return outcomes, sizes


class Worker:
    def __init__(self, settings: Settings, specs: list[ModelSpec], device: str = "auto") -> None:
        if not settings.redis_url:
            raise ValueError("REDIS_URL is not set: a worker needs a Redis to take jobs from")
        self.settings = settings
        self.specs = {spec.id: spec for spec in specs}
        self.device = device
        self.keys = Keys(settings.namespace)
        self.name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.runners: dict[str, Runner] = {}
        self.placement: Placement | None = None
        self.started_at = time.time()
        self._streams = {self.keys.stream(model_id): model_id for model_id in self.specs}
        self._stopping = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        # Reads block for up to a second, so their socket waits longer than that.
        self.redis = Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=settings.redis_timeout_s,
            socket_timeout=settings.redis_timeout_s + READ_BLOCK_MS / 1000,
            health_check_interval=30,
        )
        self._start = self.redis.register_script(START_SCRIPT)
        self._finish = self.redis.register_script(FINISH_SCRIPT)

    def stop(self) -> None:
        logger.info("worker %s: stopping after the current batch", self.name)
        self._stopping.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        try:
            await self.setup()
            heartbeat = asyncio.create_task(self._heartbeat())
            try:
                await self._consume()
            finally:
                heartbeat.cancel()
                await asyncio.gather(heartbeat, return_exceptions=True)
        finally:
            await self._leave()
            self._executor.shutdown(wait=True)

    async def setup(self) -> None:
        if self.settings.torch_threads:
            import torch

            torch.set_num_threads(self.settings.torch_threads)
        self.placement = choose_placement(self.device)
        for spec in self.specs.values():
            started = time.perf_counter()
            self.runners[spec.id] = await self._in_thread(
                load_runner, spec, self.placement, self.settings
            )
            logger.info(
                "worker %s: loaded %s on %s in %.1f s",
                self.name,
                spec.id,
                self.placement.device,
                time.perf_counter() - started,
            )
        await self._ensure_groups()

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _ensure_groups(self) -> None:
        for stream in self._streams:
            try:
                await self.redis.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _consume(self) -> None:
        while not self._stopping.is_set():
            try:
                response = await self.redis.xreadgroup(
                    CONSUMER_GROUP,
                    self.name,
                    dict.fromkeys(self._streams, ">"),
                    count=self.settings.max_batch_jobs,
                    block=READ_BLOCK_MS,
                )
                for stream, entries in cast(list[tuple[bytes, Entries]], response or []):
                    await self._run_batch(self._streams[stream.decode()], entries)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                logger.warning("worker %s: Redis unreachable (%s); retrying", self.name, exc)
                await self._pause()
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # Redis lost its data (restarted without persistence): recreate the groups.
                await self._ensure_groups()

    async def _pause(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), RETRY_PAUSE_S)

    async def _run_batch(self, model_id: str, entries: Entries) -> None:
        """Start, run, store and acknowledge one batch of one model's entries."""
        stream = self.keys.stream(model_id)
        entry_ids = [entry_id for entry_id, _ in entries]
        jobs: list[Job] = []
        for entry_id, fields in entries:
            try:
                jobs.append(Job.from_json(fields[b"job"]))
            except (KeyError, ValueError) as exc:
                logger.error("worker %s: dropping malformed entry %s: %s", self.name, entry_id, exc)

        runnable, ended = await self._start_jobs(jobs)
        outcomes: dict[str, Outcome] = dict(ended)
        sizes: list[int] = []
        if runnable:
            results, sizes = await self._in_thread(run_guarded, self.runners[model_id], runnable)
            outcomes.update(zip((job.id for job in runnable), results, strict=True))

        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        for job in jobs:
            outcome = outcomes.get(job.id)
            if outcome is not None:
                await self._store(pipe, job, outcome, now)
        pipe.xack(stream, CONSUMER_GROUP, *entry_ids)
        pipe.xdel(stream, *entry_ids)
        for size in sizes:
            pipe.hincrby(self.keys.batch_sizes(model_id), str(size), 1)
        await pipe.execute()

    async def _start_jobs(self, jobs: list[Job]) -> tuple[list[Job], dict[str, Outcome]]:
        """Mark jobs running; return those to run and outcomes for those that must not."""
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        for job in jobs:
            await self._start(keys=[self.keys.job(job.id)], args=[now], client=pipe)
        replies = await pipe.execute()
        runnable: list[Job] = []
        ended: dict[str, Outcome] = {}
        for job, (status, _attempts) in zip(jobs, replies, strict=True):
            if status != b"running":
                # Cancelled, already finished by another worker, or its record expired.
                logger.info("job %s: not run, status is %s", job.id, status.decode())
            elif job.deadline < now:
                ended[job.id] = Outcome(
                    JobStatus.EXPIRED,
                    error=JobError(
                        "the job's deadline passed before a worker could run it", "timeout"
                    ),
                )
            else:
                runnable.append(job)
        return runnable, ended

    async def _store(self, pipe: Any, job: Job, outcome: Outcome, now: float) -> None:
        error = orjson.dumps(outcome.error.to_dict()) if outcome.error else b""
        await self._finish(
            keys=[self.keys.job(job.id)],
            args=[
                outcome.status.value,
                now,
                self.settings.result_ttl_s,
                outcome.result or b"",
                error,
                job.reply_to or "",
                reply_message(job.id, outcome) if job.reply_to else b"",
            ],
            client=pipe,
        )

    async def _heartbeat(self) -> None:
        while True:
            beat = {
                "id": self.name,
                "models": sorted(self.runners),
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started_at": self.started_at,
                "heartbeat_at": time.time(),
                **(self.placement.describe() if self.placement else {}),
            }
            try:
                await self.redis.hset(self.keys.workers(), self.name, orjson.dumps(beat))
            except (RedisConnectionError, RedisTimeoutError) as exc:
                logger.warning("worker %s: heartbeat failed: %s", self.name, exc)
            await asyncio.sleep(self.settings.heartbeat_s)

    async def _leave(self) -> None:
        # Should Redis be unreachable, the heartbeat simply ages out.
        with contextlib.suppress(RedisConnectionError, RedisTimeoutError):
            await self.redis.hdel(self.keys.workers(), self.name)
        await self.redis.aclose()
