"""The worker process: load once, then take batches from Redis and run them.

Life cycle:
1. ``setup``: choose device and dtype, load every model it serves (warm), make
   sure each model's stream has the consumer group.
2. loop: read the next batch (up to ``HEARTH_MAX_BATCH_JOBS`` embedding jobs
   or ``HEARTH_MAX_BATCH_IMAGES`` image jobs of one model), start its jobs
   (skipping cancelled and expired ones), run them as one batch, store each
   outcome, acknowledge.
3. heartbeat: every ``HEARTH_HEARTBEAT_S`` the worker tells Redis which models
   it holds; the API uses that for readiness and routing.
4. on SIGTERM or SIGINT it stops reading, finishes the batch it holds, exits.

A job is acknowledged only after its outcome is stored. One batch runs at a
time, and every model call of a worker runs on one thread: the inference
thread of a worker that holds an image pipeline, the event loop's own thread
in a worker that holds none (see ``_run_on_loop``). Models are never shared
between threads. The outcomes of the batches nobody follows step by step
(embeddings, synchronous image requests) are stored by the thread that
computed them, through a connection of their own, as soon as they are
computed (see ``_run_unfollowed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, cast

import orjson
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from hearth.memory import freeze_startup_objects
from hearth.settings import Settings
from models.components import ComponentCache
from models.device import Placement, choose_placement
from models.registry import ModelKind, ModelSpec
from models.stepwise import Steps, complete, step_through
from workers.hooks import BatchHooks
from workers.metrics import WorkerMetrics
from workers.protocol import (
    CONSUMER_GROUP,
    EXPIRE_SCRIPT,
    EXPIRED_ERROR,
    LEASE_SCRIPT,
    PROGRESS_SCRIPT,
    RETRY_SCRIPT,
    START_SCRIPT,
    HeldConnection,
    InvalidJobInput,
    Job,
    JobError,
    JobStatus,
    Keys,
    Line,
    Outcome,
    Sent,
    expire_args,
    listener,
    queue_finish,
    queue_script,
)
from workers.webhooks import WebhookSender

logger = logging.getLogger(__name__)

Entries = list[tuple[bytes, dict[bytes, bytes]]]  # stream entries as XREADGROUP returns them

READ_BLOCK_MS = 1000
IMAGE_BATCH_LINGER_S = 0.005
EMBEDDING_BATCH_WAITS = 2  # an embedding batch under load waits at most this many times the wait
GATHER_POLL_S = 0.002  # how often a batch waiting on several streams looks for more jobs
# HEARTH_EMBEDDING_BATCH_WAIT_MS when unset, by device type. A GPU computes a
# batch in a few milliseconds: any wait there would cost more than it saves.
DEFAULT_EMBEDDING_BATCH_WAIT_MS = {"cpu": 10.0, "cuda": 0.0}
DEAD_LETTERS_KEPT = 10_000
RETRY_PAUSE_S = 1.0
CANCEL_MEMORY_S = 600.0  # how long a cancellation is remembered for a job not yet seen
PENDING_MARGIN = 1000  # other pending entries of this worker a batch's range may hold
CANCEL_AGAIN_S = 0.5  # how long a cancelled task may take before it is cancelled again


def _read_entries(reply: Any) -> list[tuple[bytes, list[tuple[bytes, Any]]]]:
    """An XREADGROUP reply as it came (None, or each stream's entries as lists of
    fields and values; a map of them in RESP3) in redis-py's shape: each stream
    with its entries, an entry's fields a dict (None for an entry deleted since)."""
    streams = reply.items() if isinstance(reply, dict) else (reply or [])
    return [
        (stream, [(entry_id, _pairs(fields)) for entry_id, fields in entries])
        for stream, entries in streams
    ]


def _pairs(fields: list[bytes] | None) -> dict[bytes, bytes] | None:
    return None if fields is None else dict(zip(fields[::2], fields[1::2], strict=True))


def _job_id(entry: tuple[bytes, dict[bytes, bytes]]) -> str | None:
    """The id of the job in a stream entry; None for a malformed entry."""
    try:
        job_id = orjson.loads(entry[1][b"job"])["id"]
    except (KeyError, TypeError, orjson.JSONDecodeError):
        return None
    return job_id if isinstance(job_id, str) else None


Ran = tuple[list[Outcome], list[int]]  # outcomes in the order of the jobs, pass sizes


class Runner(Protocol):
    def run(self, jobs: list[Job], hooks: BatchHooks) -> Ran: ...


class PassRunner(Runner, Protocol):
    """A runner whose batch is a series of model passes it can pause between."""

    def passes(self, jobs: list[Job], hooks: BatchHooks) -> Steps[Ran]: ...


def load_runner(
    spec: ModelSpec, placement: Placement, settings: Settings, cache: ComponentCache
) -> Runner:
    if spec.kind is ModelKind.NOOP:
        from workers.noop import NoopRunner

        return NoopRunner()
    if spec.kind is ModelKind.EMBEDDING:
        from models.embedding import EmbeddingModel
        from workers.embeddings import EmbeddingRunner

        model = EmbeddingModel(spec.path, placement, settings.max_batch_tokens)
        return EmbeddingRunner(spec.id, model)
    from models.diffusion import load_text_to_image
    from workers.images import ImageRunner

    pipe = load_text_to_image(spec.path, placement, cache, settings.batch_invariant_images)
    return ImageRunner(spec.id, pipe, settings.max_batch_images)


def run_guarded(runner: Runner, jobs: list[Job], hooks: BatchHooks) -> Steps[Ran]:
    """Run a batch, pausing between its passes where the runner has them; if it
    raises, run its jobs one by one so only the job at fault fails and the
    others still get their result."""
    try:
        # Not isinstance(runner, PassRunner): on a runtime-checkable protocol that
        # costs 15 µs, on the path of every batch.
        if hasattr(runner, "passes"):
            return (yield from cast(PassRunner, runner).passes(jobs, hooks))
        return runner.run(jobs, hooks)
    except Exception as exc:
        if len(jobs) == 1:
            if isinstance(exc, InvalidJobInput):
                return [exc.outcome()], []
            logger.exception("job %s failed", jobs[0].id)
            error = JobError(f"inference failed: {type(exc).__name__}: {exc}")
            return [Outcome(JobStatus.FAILED, error=error, retryable=True)], []
    outcomes: list[Outcome] = []
    sizes: list[int] = []
    for job in jobs:
        job_outcomes, job_sizes = yield from run_guarded(runner, [job], hooks)
        outcomes += job_outcomes
        sizes += job_sizes
    return outcomes, sizes


async def cancel_and_wait(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until every one has ended, cancelling again those
    that go on: a cancellation landing inside one of redis-py's reads can reach
    the task as a Redis timeout, which its loop then logs and carries on from
    (measured: one worker in eight told to stop right after it started never
    exited, its heartbeat still beating)."""
    while pending := [task for task in tasks if not task.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=CANCEL_AGAIN_S)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved, so that asyncio does not report it at exit


class Worker:
    def __init__(self, settings: Settings, specs: list[ModelSpec], device: str = "auto") -> None:
        if not settings.redis_url:
            raise ValueError("REDIS_URL is not set: a worker needs a Redis to take jobs from")
        self.settings = settings
        self.specs = {spec.id: spec for spec in specs}
        self.device = device
        self.keys = Keys(settings.namespace)
        self.name = (
            settings.worker_name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        self._recovering = True  # first, this worker's own unfinished entries
        self._last_batch: dict[str, int] = {}  # stream → entries in its last batch
        self._embedding_wait_s = 0.0  # set once the device is known
        self._next_reclaim = 0.0
        self.runners: dict[str, Runner] = {}
        self.placement: Placement | None = None
        self.started_at = time.time()
        self.cancelled: dict[str, float] = {}  # job id → when its cancellation was heard
        self._streams = {self.keys.stream(model_id): model_id for model_id in self.specs}
        self._stopping = asyncio.Event()
        # Every torch call runs on one thread, loading included. libgomp keeps a
        # team of threads for each thread that starts parallel work; with a second
        # team there are more OpenMP threads than cores on a small machine, and they
        # stop spinning between operations: measured on 2 cores, a 64x64 matmul took
        # 47 µs instead of 9, a demo-dit image 86 ms instead of 38, and embedding
        # batches that went to either thread lost a fifth of their throughput.
        # Image pipelines run on the inference thread, so that the event loop
        # hears cancellations and reports steps during their long calls; a worker
        # without one runs its models on the event loop's thread (see _run_on_loop).
        self._on_loop = all(spec.kind is not ModelKind.IMAGE for spec in specs)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        # Reads block for up to a second, so their socket waits longer than that.
        self.redis = Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=settings.redis_timeout_s,
            socket_timeout=settings.redis_timeout_s + READ_BLOCK_MS / 1000,
            health_check_interval=30,
        )
        # The connection a worker waiting for work blocks on (see HeldConnection).
        self._reads = HeldConnection(self.redis)
        # The connection that stores the outcomes of the batches nobody follows
        # step by step, from the thread that computed them (see _run_unfollowed).
        self.store_line = Line(
            settings.redis_url,
            socket_connect_timeout=settings.redis_timeout_s,
            socket_timeout=settings.redis_timeout_s,
            health_check_interval=30,
        )
        self._progress_writes: set[asyncio.Task[Any]] = set()
        self._last_progress: asyncio.Task[Any] | None = None
        self.webhooks = WebhookSender(settings, self.redis, self.keys)
        self.metrics = WorkerMetrics()

    def stop(self) -> None:
        logger.info("worker %s: stopping after the batch it holds", self.name)
        self._stopping.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        try:
            await self.setup()
            freeze_startup_objects()  # the models and libraries live as long as the worker
            background = [
                asyncio.create_task(self._heartbeat()),
                asyncio.create_task(self._hear_cancellations()),
            ]
            try:
                await self._consume()
            finally:
                await cancel_and_wait(background)
                await self.webhooks.drain()
        finally:
            await self._leave()
            self._executor.shutdown(wait=True)

    async def setup(self) -> None:
        if self.settings.torch_threads:
            import torch

            torch.set_num_threads(self.settings.torch_threads)
        self.placement = choose_placement(self.device)
        wait_ms = self.settings.embedding_batch_wait_ms
        if wait_ms is None:
            wait_ms = DEFAULT_EMBEDDING_BATCH_WAIT_MS.get(self.placement.device.type, 0.0)
        self._embedding_wait_s = wait_ms / 1000
        cache = ComponentCache()
        for spec in self.specs.values():
            started = time.perf_counter()
            load = (spec, self.placement, self.settings, cache)
            if self._on_loop:
                self.runners[spec.id] = load_runner(*load)
            else:
                self.runners[spec.id] = await self._in_thread(load_runner, *load)
            load_seconds = time.perf_counter() - started
            self.metrics.load_seconds.labels(spec.id).set(load_seconds)
            logger.info(
                "worker %s: loaded %s on %s in %.1f s",
                self.name,
                spec.id,
                self.placement.device,
                load_seconds,
            )
        await self._ensure_groups()
        self.metrics.track_device(str(self.placement.device))
        if self.settings.worker_metrics_port:
            self.metrics.serve(self.settings.worker_metrics_port)

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _ensure_groups(self) -> None:
        for stream in self._streams:
            try:
                await self.redis.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def _batch_limit(self, model_id: str) -> int:
        if self.specs[model_id].kind is ModelKind.IMAGE:
            return self.settings.max_batch_images
        return self.settings.max_batch_jobs

    async def _consume(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._run_batches(await self._read())
            except (RedisConnectionError, RedisTimeoutError) as exc:
                logger.warning("worker %s: Redis unreachable (%s); retrying", self.name, exc)
                await self._pause()
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    logger.exception("worker %s: Redis refused a command; retrying", self.name)
                    await self._pause()
                    continue
                # Redis lost its data (restarted without persistence): recreate the groups.
                await self._ensure_groups()
            except Exception:
                # The loop never dies: what this batch held stays pending and is taken over.
                logger.exception("worker %s: batch failed; carrying on", self.name)
                await self._pause()

    async def _read(self) -> list[tuple[str, Entries]]:
        """The next batch of each model that has work, waiting up to a second for any.

        First come this worker's own unfinished entries (a restart under the same
        name), then, now and then, entries another worker took and went silent on.
        """
        if self._recovering:
            taken = await self._take(list(self._streams), start="0")
            self._recovering = bool(taken)
        elif time.monotonic() >= self._next_reclaim:
            self._next_reclaim = time.monotonic() + self.settings.reclaim_after_s / 4
            taken = await self._reclaim()
        else:
            taken = {}
        if not taken and len(self._streams) > 1:
            taken = await self._take(list(self._streams))
        if not taken:
            # Wait for work. With several streams, one entry each: COUNT is shared by
            # every stream in a read, and models differ in their batch limits.
            taken = await self._take(list(self._streams), block_ms=READ_BLOCK_MS)
        await self._gather_more(taken)
        for stream, entries in taken.items():
            self._last_batch[stream] = len(entries)
        return [(self._streams[stream], entries) for stream, entries in taken.items()]

    async def _gather_more(self, taken: dict[str, Entries]) -> None:
        """Let a batch under load fill a moment longer before it starts.

        Under load (the model's last batch held several jobs), the clients it
        answered send their next requests a moment apart. The batch waits for
        them: it starts once it holds as many jobs as the last one did, or once
        its wait (see ``_linger``) brings no new job for a while, or at its
        deadline. On a CPU, a pass of 30 texts costs less per text than two
        passes of 15, and the pass then runs while the API has little to do
        instead of both contending for the cores. A lone client is never kept
        waiting.
        """
        now = time.monotonic()
        lingering = {
            stream: linger
            for stream, entries in taken.items()
            if (linger := self._linger(stream, len(entries), now)) is not None
        }
        for stream in lingering:
            self._prepare(stream, taken[stream])
        while lingering:
            if len(lingering) == 1:
                # One stream (the usual case): a read that waits for its next job,
                # and returns as soon as it is there.
                ((stream, linger),) = lingering.items()
                wait_ms = max(1, math.ceil(linger.left(now) * 1000))
                more = await self._take([stream], block_ms=wait_ms, held=taken)
            else:
                await asyncio.sleep(GATHER_POLL_S)
                more = await self._take(list(lingering), held=taken)
            for stream, entries in more.items():
                taken[stream] += entries
                self._prepare(stream, entries)
            now = time.monotonic()  # the quiet wait starts once the new jobs are prepared
            for stream in more:
                lingering[stream].heard = now
            lingering = {
                stream: linger
                for stream, linger in lingering.items()
                if not linger.over(len(taken[stream]), now)
            }

    def _prepare(self, stream: str, entries: Entries) -> None:
        """Have the runner of a gathering batch do what it can before the batch
        starts (see ``EmbeddingRunner.prepare``). The batch does what this could
        not, and meets any fault in it there, where it fails only its job."""
        prepare = getattr(self.runners[self._streams[stream]], "prepare", None)
        if prepare is None:
            return
        jobs: list[Job] = []
        for _entry_id, fields in entries:
            with contextlib.suppress(KeyError, TypeError, ValueError):
                jobs.append(Job.from_json(fields[b"job"]))
        try:
            prepare(jobs)
        except Exception:  # a job's input its runner refuses: the batch isolates it
            logger.debug("worker %s: preparing a batch failed", self.name, exc_info=True)

    def _linger(self, stream: str, held: int, now: float) -> _Linger | None:
        """How a batch of ``held`` jobs from ``stream`` waits for more; None: it starts at once.

        An image call takes far longer than its clients' gaps, so an image batch
        waits them out, up to IMAGE_BATCH_LINGER_S. An embedding batch waits as
        long as each HEARTH_EMBEDDING_BATCH_WAIT_MS brings another job, at most
        EMBEDDING_BATCH_WAITS times that in all.
        """
        model_id = self._streams[stream]
        target = min(self._last_batch.get(stream, 0), self._batch_limit(model_id))
        if target <= 1 or held >= target:
            return None
        kind = self.specs[model_id].kind
        if kind is ModelKind.IMAGE:
            return _Linger(target, IMAGE_BATCH_LINGER_S, now, now + IMAGE_BATCH_LINGER_S)
        if kind is ModelKind.EMBEDDING and self._embedding_wait_s > 0:
            wait_s = self._embedding_wait_s
            return _Linger(target, wait_s, now, now + EMBEDDING_BATCH_WAITS * wait_s)
        return None

    async def _take(
        self,
        streams: list[str],
        block_ms: int | None = None,
        start: str = ">",
        held: dict[str, Entries] | None = None,
    ) -> dict[str, Entries]:
        """Read from each stream up to its model's batch limit, less what is ``held``.

        Without ``block_ms`` the reads are pipelined and return at once; with it,
        one read waits that long for the first entry in any of the streams.
        ``start`` ">" takes new entries, "0" this consumer's own pending ones.
        """
        held = held or {}

        def room(stream: str) -> int:  # what its batch may still take, at least one
            return max(self._batch_limit(self._streams[stream]) - len(held.get(stream, [])), 1)

        if block_ms is not None:
            count = 1 if len(streams) > 1 else room(streams[0])
            read = ("XREADGROUP", "GROUP", CONSUMER_GROUP, self.name, "COUNT", count)
            starts = [start] * len(streams)
            (reply,) = await self._reads.exchange(
                [(*read, "BLOCK", block_ms, "STREAMS", *streams, *starts)]
            )
            if isinstance(reply, Exception):
                raise reply
            replies = [_read_entries(reply)]
        else:
            pipe = self.redis.pipeline(transaction=False)
            for stream in streams:
                pipe.xreadgroup(CONSUMER_GROUP, self.name, {stream: start}, count=room(stream))
            replies = await pipe.execute()
        taken: dict[str, Entries] = {}
        for reply in replies:
            for key, entries in cast(list[tuple[bytes, Entries]], reply or []):
                # Pending entries deleted from the stream come back without fields.
                present = [(entry_id, fields) for entry_id, fields in entries if fields]
                if present:
                    taken[key.decode()] = present
        return taken

    async def _reclaim(self) -> dict[str, Entries]:
        """Take over entries idle past HEARTH_RECLAIM_AFTER_S: their worker died or hangs."""
        idle_ms = int(self.settings.reclaim_after_s * 1000)
        pipe = self.redis.pipeline(transaction=False)
        for stream, model_id in self._streams.items():
            pipe.xautoclaim(
                stream, CONSUMER_GROUP, self.name, idle_ms, "0-0", count=self._batch_limit(model_id)
            )
        taken: dict[str, Entries] = {}
        for stream, (_next, entries, *_deleted) in zip(
            self._streams, await pipe.execute(), strict=True
        ):
            present = [(entry_id, fields) for entry_id, fields in entries if fields]
            if present:
                logger.warning(
                    "worker %s: took over %d job(s) of %s from a silent worker",
                    self.name,
                    len(present),
                    self._streams[stream],
                )
                taken[stream] = present
        return taken

    async def _pause(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), RETRY_PAUSE_S)

    async def _run_batches(self, batches: list[tuple[str, Entries]]) -> None:
        """Run the batches of one read, one after the other.

        Every entry stays claimed from the read until its batch is done: a batch
        waiting for the one before it to finish is held, not abandoned, and no
        other worker may take it over meanwhile.
        """
        loop = asyncio.get_running_loop()
        after_s = self.settings.reclaim_after_s / 3
        holds = [
            _Hold(loop, after_s, partial(self._keep_claimed, self.keys.stream(model_id), entries))
            for model_id, entries in batches
        ]
        try:
            for (model_id, entries), hold in zip(batches, holds, strict=True):
                await self._run_batch(model_id, entries)
                await hold.release()
        finally:
            for hold in holds:
                await hold.release()

    async def _run_batch(self, model_id: str, entries: Entries) -> None:
        """Start, run, store and acknowledge one batch of one model's entries."""
        jobs: list[Job] = []
        entry_of: dict[str, bytes] = {}
        for entry_id, fields in entries:
            try:
                jobs.append(Job.from_json(fields[b"job"]))
            except (KeyError, ValueError) as exc:
                logger.error("worker %s: dropping malformed entry %s: %s", self.name, entry_id, exc)
                continue
            entry_of[jobs[-1].id] = entry_id
        batch = _Batch(model_id, [entry_id for entry_id, _ in entries], jobs, entry_of, time.time())
        if jobs and self._unfollowed(model_id, jobs):
            finishes, replies = await self._run_unfollowed(batch)
        else:
            finishes, replies = await self._run_followed(batch)
        for job in jobs:
            self.cancelled.pop(job.id, None)
            # Only the finish that ended the job tells its webhook: one that found it
            # ended already (cancelled by the API, which told it, or stored by a
            # run of another worker) tells nothing.
            if job.webhook and job.id in finishes and replies[finishes[job.id]] == 1:
                self.webhooks.send(job.id, job.webhook)

    async def _run_unfollowed(self, batch: _Batch) -> tuple[dict[str, int], list[Any]]:
        """Run a batch nobody follows step by step, storing its outcomes from the
        thread that computed them. Returns where each job's FINISH_SCRIPT reply
        landed, and the replies.

        The batch's marking (its jobs marked running) goes out first, on the
        store line, without waiting; the batch then goes to the inference
        thread (or runs on the event loop's, see ``_run_on_loop``), and the
        marking's answer, in by then, is read there once the compute is done:
        the marking's round trip overlaps the compute, and no event loop work
        contends with the compute's start for the interpreter. The thread then
        drops the results of jobs that must not run (cancelled meanwhile,
        expired) and stores the others straight away, without handing back to
        the event loop first: on a small machine that hand-off cost a lone
        client more than the store itself. Embeddings report no steps; image
        jobs of synchronous requests have nobody watching their events.
        """
        loop = asyncio.get_running_loop()
        hooks = _Hooks(self, loop, batch.jobs)
        marking = self._send_marking(batch.jobs)
        if self._on_loop:
            return await self._run_on_loop(batch, marking, hooks)

        def tell(job_id: str, url: str) -> None:  # from the inference thread: to the loop
            loop.call_soon_threadsafe(self.webhooks.send, job_id, url)

        return await loop.run_in_executor(
            self._executor, self._compute_and_store, batch, marking, hooks, tell
        )

    def _send_marking(self, jobs: list[Job]) -> _Marking:
        """Send the scripts that mark ``jobs`` running on the store line; their
        answer is read later (``_marked``)."""
        now = time.time()
        pipe = self.store_line.pipeline()
        overdue = self._queue_starts(pipe, jobs, now)
        return _Marking(self.store_line.send(pipe), overdue, now)

    def _marked(
        self, batch: _Batch, marking: _Marking, tell: Callable[[str, str], None] | None = None
    ) -> _Starts:
        """What the answer to ``marking`` says of ``batch``'s jobs (see ``_start_jobs``)."""
        replies = marking.sent.replies()
        return self._starts(batch.jobs, marking.overdue, replies, marking.now, tell)

    async def _run_on_loop(
        self, batch: _Batch, marking: _Marking, hooks: BatchHooks
    ) -> tuple[dict[str, int], list[Any]]:
        """``_run_unfollowed`` on the event loop's own thread, for a worker that
        holds no image pipeline.

        Read through the event loop's pipeline instead, the marking's answer took
        0.5-0.9 ms more: parsed reply by reply, over several turns of the loop,
        after the compute. The batch pauses after each model pass, so heartbeats
        and leases go on through a long one. A lone client's request skips the
        hand-off to another thread, which on a 2-core machine cost it half a
        millisecond.
        """
        try:
            every, sizes = await step_through(
                run_guarded(self.runners[batch.model_id], batch.jobs, hooks)
            )
        except BaseException:
            marking.sent.abandon()  # the batch was interrupted: nothing is stored
            raise
        return self._store_computed(batch, self._marked(batch, marking), every, sizes)

    def _compute_and_store(
        self,
        batch: _Batch,
        marking: _Marking,
        hooks: BatchHooks,
        tell: Callable[[str, str], None],
    ) -> tuple[dict[str, int], list[Any]]:
        """On the inference thread: run every job of ``batch``, then store the
        outcomes of those its marking lets run (see ``_run_unfollowed``)."""
        try:
            every, sizes = complete(run_guarded(self.runners[batch.model_id], batch.jobs, hooks))
        except BaseException:
            marking.sent.abandon()
            raise
        return self._store_computed(batch, self._marked(batch, marking, tell), every, sizes)

    def _store_computed(
        self, batch: _Batch, started: _Starts, every: list[Outcome], sizes: list[int]
    ) -> tuple[dict[str, int], list[Any]]:
        """Store, through the store line, the outcomes of the jobs that
        ``started`` lets run (``every`` holds one per job of ``batch``), and wait
        for Redis's answer."""
        by_id = dict(zip((job.id for job in batch.jobs), every, strict=True))
        outcomes = dict(started.ended)
        outcomes.update((job.id, by_id[job.id]) for job in started.runnable)
        if not started.runnable:
            sizes = []  # nothing it computed is kept: no pass to count
        pipe = self.store_line.pipeline()
        stored = self._queue_store(pipe, batch, outcomes, started, sizes)
        sent = self.store_line.send(pipe)
        # Counted while Redis stores: the metrics wait, the client does not.
        self._observe_queued(batch, started.runnable)
        self._count(batch, stored)
        return stored.finishes, sent.replies()

    async def _run_followed(self, batch: _Batch) -> tuple[dict[str, int], list[Any]]:
        """Run a batch whose jobs' steps a client may follow: marked running first,
        so that a job cancelled while queued never runs and its events come in
        order; stored from the event loop, after the progress reports."""
        started = await self._start_jobs(batch.jobs)
        self._observe_queued(batch, started.runnable)
        outcomes = dict(started.ended)
        sizes: list[int] = []
        if started.runnable:
            results, sizes = await self._compute(batch.model_id, started.runnable)
            outcomes.update(zip((job.id for job in started.runnable), results, strict=True))
            # Progress reports queued during the run land before the outcome does.
            await asyncio.gather(*self._progress_writes, return_exceptions=True)
        pipe = self.redis.pipeline(transaction=False)
        stored = self._queue_store(pipe, batch, outcomes, started, sizes)
        replies = await pipe.execute()
        self._count(batch, stored)
        return stored.finishes, replies

    def _observe_queued(self, batch: _Batch, runnable: list[Job]) -> None:
        for job in runnable:
            self.metrics.queued_seconds.labels(batch.model_id).observe(
                max(0.0, batch.started - job.created_at)
            )

    def _queue_store(
        self,
        pipe: Any,
        batch: _Batch,
        outcomes: dict[str, Outcome],
        started: _Starts,
        sizes: list[int],
    ) -> _Stored:
        """Queue on ``pipe`` (the event loop's or the store line's) every
        outcome of ``batch``, another attempt for those that may retry, the
        acknowledgement of its entries and its pass sizes. Returns where each
        FINISH_SCRIPT reply lands among the pipeline's replies, and what the
        metrics count once the store is on its way (``_count``)."""
        now = time.time()
        model_id = batch.model_id
        finishes: dict[str, int] = {}
        statuses: list[JobStatus] = []
        for job in batch.jobs:
            outcome = outcomes.get(job.id)
            if outcome is None:
                continue
            attempts = started.attempts[job.id]
            if outcome.retryable and attempts < self.settings.max_attempts:
                self._retry(pipe, job, outcome)
                continue
            if outcome.retryable:
                outcome = self._give_up(pipe, job, outcome, attempts)
            finishes[job.id] = self._store(pipe, job, outcome, batch.started, now)
            statuses.append(outcome.status)
        # An entry whose job another live worker is running stays where it is: that
        # worker acknowledges it, or, should it die, the next one takes it over.
        held_elsewhere = {batch.entry_of[job_id] for job_id in started.busy}
        done = [entry_id for entry_id in batch.entry_ids if entry_id not in held_elsewhere]
        stream = self.keys.stream(model_id)
        if done:
            pipe.xack(stream, CONSUMER_GROUP, *done)
            pipe.xdel(stream, *done)
        for size in sizes:
            pipe.hincrby(self.keys.batch_sizes(model_id), str(size), 1)
        return _Stored(finishes, statuses, sizes, now)

    def _count(self, batch: _Batch, stored: _Stored) -> None:
        """Count a batch's stored outcomes and passes in the worker's metrics."""
        metrics, model_id = self.metrics, batch.model_id
        for status in stored.statuses:
            metrics.jobs.labels(model_id, status.value).inc()
            metrics.run_seconds.labels(model_id).observe(stored.at - batch.started)
        for size in stored.sizes:
            metrics.batch_size.labels(model_id).observe(size)

    def _unfollowed(self, model_id: str, jobs: list[Job]) -> bool:
        """Whether no client follows these jobs' steps (see ``_Hooks``)."""
        if self.specs[model_id].kind is ModelKind.EMBEDDING:
            return True
        return all(job.reply_to is not None and not job.webhook for job in jobs)

    async def _keep_claimed(self, stream: str, entries: Entries) -> None:
        """While this worker holds ``entries`` (waiting or running), keep them and
        the leases of their running jobs fresh, so no other worker takes them over.

        Only entries still this worker's are refreshed: one that another worker
        took over while this one was stalled is left to it. Started a third of a
        lease after the read (see ``_Hold``), it refreshes at once, then every
        third of a lease.
        """
        lease_s = self.settings.reclaim_after_s
        entry_ids = [entry_id for entry_id, _ in entries]
        job_keys = [self.keys.job(job_id) for job_id in map(_job_id, entries) if job_id]
        while True:
            with contextlib.suppress(RedisConnectionError, RedisTimeoutError):
                pending = await self.redis.xpending_range(
                    stream,
                    CONSUMER_GROUP,
                    min=min(entry_ids),
                    max=max(entry_ids),
                    count=len(entry_ids) + PENDING_MARGIN,
                    consumername=self.name,
                )
                mine = {cast(bytes, entry["message_id"]) for entry in pending}
                ids: list[int | bytes | str | memoryview[int]] = [
                    entry_id for entry_id in entry_ids if entry_id in mine
                ]
                pipe = self.redis.pipeline(transaction=False)
                if ids:
                    pipe.xclaim(stream, CONSUMER_GROUP, self.name, 0, ids, justid=True)
                for key in job_keys:
                    queue_script(pipe, LEASE_SCRIPT, [key], [self.name, lease_s])
                await pipe.execute()
            await asyncio.sleep(lease_s / 3)

    def _retry(self, pipe: Any, job: Job, outcome: Outcome) -> None:
        """Queue another attempt: back to queued, as a new entry at the stream's end."""
        assert outcome.error is not None
        logger.warning("job %s: attempt failed, queued again: %s", job.id, outcome.error.message)
        error = orjson.dumps(outcome.error.to_dict())
        queue_script(pipe, RETRY_SCRIPT, [self.keys.job(job.id)], [error])
        pipe.xadd(self.keys.stream(job.model), {"job": job.to_json()})

    def _give_up(self, pipe: Any, job: Job, outcome: Outcome, attempts: int) -> Outcome:
        """The job's last attempt failed: to the dead letters, and failed for good."""
        assert outcome.error is not None
        message = f"gave up after {attempts} attempt(s); last error: {outcome.error.message}"
        logger.error("job %s: %s", job.id, message)
        error = JobError(message, outcome.error.type)
        pipe.xadd(
            self.keys.dead_letters(),
            {"job": job.to_json(), "error": orjson.dumps(error.to_dict())},
            maxlen=DEAD_LETTERS_KEPT,
            approximate=True,
        )
        return Outcome(JobStatus.FAILED, error=error)

    async def _compute(self, model_id: str, jobs: list[Job]) -> Ran:
        """Run ``jobs`` on the thread that runs this worker's models."""
        loop = asyncio.get_running_loop()
        steps = run_guarded(self.runners[model_id], jobs, _Hooks(self, loop, jobs))
        if self._on_loop:
            return await step_through(steps)
        return await loop.run_in_executor(self._executor, complete, steps)

    async def _start_jobs(self, jobs: list[Job]) -> _Starts:
        """Mark jobs running: which to run, outcomes for those that must not
        (expired, or over the attempt limit), each started job's attempt number,
        and the ids of the jobs another live worker is running.

        A job still queued past its deadline ends `expired` without starting, as
        the API ends it when it reads it first; its webhook is told here.
        """
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        overdue = self._queue_starts(pipe, jobs, now)
        return self._starts(jobs, overdue, await pipe.execute(), now)

    def _queue_starts(self, pipe: Any, jobs: list[Job], now: float) -> list[Job]:
        """Queue on ``pipe`` the scripts that mark ``jobs`` running (see
        ``_start_jobs``); returns the overdue jobs, whose replies come first."""
        overdue = [job for job in jobs if job.deadline < now]
        for job in overdue:
            args = expire_args(self.keys, job.id, now, self.settings.result_ttl_s, job.reply_to)
            queue_script(pipe, EXPIRE_SCRIPT, [self.keys.job(job.id)], args)
        for job in jobs:
            args = [now, self.keys.events(job.id), self.name, self.settings.reclaim_after_s]
            queue_script(pipe, START_SCRIPT, [self.keys.job(job.id)], args)
        return overdue

    def _starts(
        self,
        jobs: list[Job],
        overdue: list[Job],
        replies: list[Any],
        now: float,
        tell: Callable[[str, str], None] | None = None,
    ) -> _Starts:
        """What the replies of ``_queue_starts``'s scripts say (see ``_start_jobs``).
        ``tell`` tells a job's webhook in place of ``webhooks.send``, where this
        runs off the event loop."""
        tell = tell or self.webhooks.send
        for job, expired in zip(overdue, replies[: len(overdue)], strict=True):
            if expired:
                self.metrics.jobs.labels(job.model, JobStatus.EXPIRED.value).inc()
                if job.webhook:
                    tell(job.id, job.webhook)
        runnable: list[Job] = []
        ended: dict[str, Outcome] = {}
        attempts: dict[str, int] = {}
        busy: set[str] = set()
        starts = replies[len(overdue) :]
        for job, (status, attempt, last_error) in zip(jobs, starts, strict=True):
            if status == b"busy":
                logger.warning("job %s: not run, another live worker is running it", job.id)
                busy.add(job.id)
                continue
            if status != b"running":
                # Cancelled, expired in the queue, finished by another worker, or its record gone.
                logger.info("job %s: not run, status is %s", job.id, status.decode())
                continue
            attempts[job.id] = int(attempt)
            if job.deadline < now:
                # Taken over past its deadline from a worker that went silent.
                ended[job.id] = Outcome(JobStatus.EXPIRED, error=EXPIRED_ERROR)
            elif attempts[job.id] > self.settings.max_attempts:
                # Earlier attempts never ended: the worker running them died each time.
                last = orjson.loads(last_error)["message"] if last_error else "its worker stopped"
                error = JobError(last)
                ended[job.id] = Outcome(JobStatus.FAILED, error=error, retryable=True)
            else:
                runnable.append(job)
        return _Starts(runnable, ended, attempts, busy)

    def _store(self, pipe: Any, job: Job, outcome: Outcome, started: float, now: float) -> int:
        """Queue the job's outcome on ``pipe``. Returns where, among the pipeline's
        replies, FINISH_SCRIPT's lands: 1 there when this outcome ended the job."""
        ttl = self.settings.result_ttl_s
        for file_id, content in outcome.files.items():
            pipe.set(self.keys.file(file_id), content, ex=ttl)
        return queue_finish(pipe, self.keys, job, outcome, ttl, started, now)

    def report_progress(self, job_ids: list[str], step: int, total: int) -> None:
        """Called on the event loop: record and announce a batch's progress."""
        progress = orjson.dumps({"step": step, "total": total})
        event = orjson.dumps({"event": "progress", "step": step, "total": total})

        previous = self._last_progress

        async def write() -> None:
            # Writes go out in order: on separate connections, a later step could
            # otherwise land first and be overwritten by an earlier one.
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            pipe = self.redis.pipeline(transaction=False)
            for job_id in job_ids:
                args: list[bytes | str] = [progress, self.keys.events(job_id), event]
                queue_script(pipe, PROGRESS_SCRIPT, [self.keys.job(job_id)], args)
            await pipe.execute()

        task = asyncio.create_task(write())
        self._last_progress = task
        self._progress_writes.add(task)
        task.add_done_callback(self._progress_written)

    def _progress_written(self, task: asyncio.Task[Any]) -> None:
        self._progress_writes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("worker %s: progress report failed: %s", self.name, task.exception())

    async def _hear_cancellations(self) -> None:
        # Until the worker stops: a cancellation landing inside redis-py's reads
        # can be absorbed there (see app/dispatcher.py's listener).
        while not self._stopping.is_set():
            pubsub = listener(self.redis)
            try:
                await pubsub.subscribe(self.keys.cancellations())
                while not self._stopping.is_set():
                    message = await pubsub.get_message(timeout=RETRY_PAUSE_S)
                    now = time.monotonic()
                    if message is not None:
                        self.cancelled[message["data"].decode()] = now
                    for job_id, heard in list(self.cancelled.items()):
                        if now - heard > CANCEL_MEMORY_S:
                            del self.cancelled[job_id]
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                logger.warning("worker %s: cancellations unheard (%s); retrying", self.name, exc)
                await asyncio.sleep(RETRY_PAUSE_S)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

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
        await self._reads.close()
        await self.redis.aclose()
        self.store_line.close()


@dataclass(frozen=True)
class _Batch:
    """The jobs of one model's entries, read together and run as one batch."""

    model_id: str
    entry_ids: list[bytes]
    jobs: list[Job]  # the entries that hold a readable job
    entry_of: dict[str, bytes]  # job id → its entry
    started: float  # time.time() when the batch began


@dataclass(frozen=True)
class _Marking:
    """A batch's marking, sent and not yet answered (see ``Worker._send_marking``)."""

    sent: Sent
    overdue: list[Job]  # the jobs past their deadline, whose replies come first
    now: float


class _Hold:
    """Entries kept claimed while their batch waits and runs (``Worker._keep_claimed``),
    from a third of a lease on: most batches are done by then, and until then
    the hold is a timer, not a task, so a lone request's batch starts without
    one more task to create and step through first."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        after_s: float,
        keep: Callable[[], Coroutine[Any, Any, None]],
    ) -> None:
        self._loop = loop
        self._task: asyncio.Task[None] | None = None
        self._timer = loop.call_later(after_s, self._start, keep)

    def _start(self, keep: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._task = self._loop.create_task(keep())

    async def release(self) -> None:
        """Stop keeping the entries (again: harmless)."""
        self._timer.cancel()
        if self._task is not None:
            await cancel_and_wait([self._task])


@dataclass(frozen=True)
class _Stored:
    """A batch's store, queued (see ``Worker._queue_store``)."""

    finishes: dict[str, int]  # job id → where its FINISH_SCRIPT reply lands
    statuses: list[JobStatus]  # of the outcomes stored, for the metrics
    sizes: list[int]  # the batch's passes, images or texts each
    at: float  # time.time() of the store


@dataclass(frozen=True)
class _Starts:
    """What marking a batch's jobs running found (see ``Worker._start_jobs``)."""

    runnable: list[Job]
    ended: dict[str, Outcome]  # job id → the outcome of a job that must not run
    attempts: dict[str, int]  # job id → its attempt number, for every started job
    busy: set[str]  # jobs another live worker is running


@dataclass
class _Linger:
    """A batch waiting for more jobs: it starts once it holds ``target`` jobs,
    once ``quiet_s`` passes with no new one, or at ``deadline``."""

    target: int
    quiet_s: float
    heard: float  # time.monotonic() of the last job that joined, or of the wait's start
    deadline: float

    def over(self, held: int, now: float) -> bool:
        return held >= self.target or self.left(now) <= 0

    def left(self, now: float) -> float:
        """Seconds until the wait ends unless another job joins."""
        return min(self.heard + self.quiet_s, self.deadline) - now


class _Hooks:
    """BatchHooks for the thread that runs a batch, handing progress to the event loop.

    Progress is reported for queued jobs only: a synchronous request's client
    never learns its job's id, so nobody could follow it, and the writes would
    only slow the batch down.
    """

    def __init__(self, worker: Worker, loop: asyncio.AbstractEventLoop, jobs: list[Job]) -> None:
        self.worker = worker
        self.loop = loop
        self.followed = {job.id for job in jobs if job.reply_to is None}

    def progress(self, job_ids: list[str], step: int, total: int) -> None:
        followed = [job_id for job_id in job_ids if job_id in self.followed]
        if followed:
            self.loop.call_soon_threadsafe(self.worker.report_progress, followed, step, total)

    def cancelled(self, job_id: str) -> bool:
        return job_id in self.worker.cancelled
