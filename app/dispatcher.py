"""Puts jobs on model streams and hands each waiting request its outcome.

One dispatcher per API process. It subscribes once to its own reply channel;
workers publish there when a job it submitted ends, and the listener resolves
the waiting request's future, so a waiting request costs no Redis traffic.
Should a reply be missed (a dropped connection), a sweeper reads the record
of each job waited on for longer than ``POLL_S`` and finds the outcome there;
it also ends the waits that pass their deadline, and those whose job's record
is gone (Redis lost its data) at once.

Reading a job also ends it `expired` when it is still queued past its deadline,
so that a job no worker took still ends; the dispatcher then delivers its
webhook, as it does for the jobs it cancels.

Jobs submitted at the same moment (a burst of requests handled in one turn of
the event loop, or while the pipeline before is on the wire) travel to Redis
in one pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.errors import Overloaded, Unavailable
from app.idempotency import Idempotency, claim
from workers.protocol import (
    ENQUEUE_SCRIPT,
    EXPIRE_SCRIPT,
    FINISH_SCRIPT,
    TERMINAL_STATUSES,
    HeldConnection,
    Job,
    JobError,
    JobStatus,
    Keys,
    expire_args,
    job_view,
    listener,
    parse_reply,
    read_job,
    script_call,
)
from workers.webhooks import WebhookSender

logger = logging.getLogger(__name__)

POLL_S = 1.0  # how long a reply may be missing before the job's record is read
SWEEP_S = 0.25  # how often waits are checked: deadlines are kept this closely
OUTCOME_FIELDS = ("status", "result", "error", "started_at", "finished_at")
LOST: dict[str, Any] = {}  # what _read_outcomes gives for a job whose record is gone


class DeadlinePassed(TimeoutError):
    """A synchronous wait ran past its deadline. ``cancelled``: the job was this
    request's own, and is now cancelled; a job it only joined goes on."""

    def __init__(self, job_id: str, cancelled: bool) -> None:
        super().__init__(job_id)
        self.job_id = job_id
        self.cancelled = cancelled


@dataclass(eq=False)
class _Waiter:
    """A request waiting for a job's end."""

    deadline: float  # time.time() past which it gives up
    future: asyncio.Future[dict[str, Any]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    since: float = field(default_factory=time.monotonic)
    submitted: bool = False  # the job's record is written: from then on, a missing one was lost


class Dispatcher:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        result_ttl_s: int,
        max_queue_depth: int,
        webhooks: WebhookSender | None = None,
        submits: Redis | None = None,
        submit_timeout_s: float | None = None,
    ) -> None:
        self.redis = redis
        # Submits go through a connection of ``submits`` (else ``redis``) held for
        # them, their pipeline bounded by ``submit_timeout_s`` as a whole: a client
        # whose connections time every reply they read (redis-py's socket timeout)
        # spends a timer on each, three per job, and a submit pipeline under load
        # holds dozens of jobs. Taking a pooled connection and redis-py's pipeline
        # for each cost a lone request 0.1-0.2 ms on a 2-core machine.
        self.submits = HeldConnection(submits or redis)
        self.submit_timeout_s = submit_timeout_s
        self.keys = keys
        self.result_ttl_s = result_ttl_s
        self.max_queue_depth = max_queue_depth
        self.webhooks = webhooks  # None: the jobs this process ends tell no webhook
        self.channel = keys.replies(uuid.uuid4().hex)
        self._waiting: dict[str, list[_Waiter]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._finish = redis.register_script(FINISH_SCRIPT)
        self._expire = redis.register_script(EXPIRE_SCRIPT)
        # Submits not yet sent (the job, its TTL, whether its record is written
        # already), and the pipelines sending the others.
        self._submits: list[tuple[Job, int, bool, asyncio.Future[bytes | None]]] = []
        self._flushes: set[asyncio.Task[None]] = set()
        self._flushing = asyncio.Lock()  # one submit pipeline on the wire at a time

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen(), name="reply-listener"),
            asyncio.create_task(self._sweep(), name="wait-sweeper"),
        ]

    async def stop(self) -> None:
        # A cancellation that lands inside redis-py's reads can be absorbed there,
        # the listener then reading on: the flag ends its loops within POLL_S.
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._flushes, return_exceptions=True)
        await self.submits.close()

    async def _listen(self) -> None:
        while not self._stopping:
            pubsub = listener(self.redis)
            try:
                await pubsub.subscribe(self.channel)
                while not self._stopping:
                    # A bounded wait: an unbounded one would trip the socket timeout.
                    message = await pubsub.get_message(timeout=POLL_S)
                    if message is not None:
                        self._resolve(parse_reply(message["data"]))
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                logger.warning("reply listener: Redis unreachable (%s); resubscribing", exc)
                await asyncio.sleep(POLL_S)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _resolve(self, reply: dict[str, Any]) -> None:
        for waiter in self._waiting.get(reply["id"], ()):
            if not waiter.future.done():
                waiter.future.set_result(reply)

    async def _sweep(self) -> None:
        """End the waits past their deadline; find the outcomes whose reply went
        missing, and the jobs Redis lost."""
        while not self._stopping:
            await asyncio.sleep(SWEEP_S)
            try:
                now, clock = time.time(), time.monotonic()
                overdue: list[str] = []
                for job_id, waiters in self._waiting.items():
                    pending = [waiter for waiter in waiters if not waiter.future.done()]
                    for waiter in pending:
                        if now >= waiter.deadline:
                            waiter.future.set_exception(TimeoutError(job_id))
                    if any(clock - waiter.since >= POLL_S for waiter in pending):
                        overdue.append(job_id)
                if overdue:
                    outcomes = await self._read_outcomes(overdue)
                    for job_id, reply in zip(overdue, outcomes, strict=True):
                        if reply is LOST:
                            self._lost(job_id)
                        elif reply is not None:
                            self._resolve(reply)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                logger.warning("wait sweeper: Redis unreachable (%s)", exc)
            except Exception:  # the sweeper never dies: every wait depends on it
                logger.exception("wait sweeper: check failed")

    def _lost(self, job_id: str) -> None:
        """End the waits on a job whose record is gone: Redis lost it (a restart
        without persistence, a flush), so no outcome will ever come."""
        for waiter in self._waiting.get(job_id, ()):
            if waiter.submitted and not waiter.future.done():
                waiter.future.set_exception(self._lost_error(job_id))

    @staticmethod
    def _lost_error(job_id: str) -> Unavailable:
        return Unavailable(
            f"The job queue (Redis) lost job '{job_id}' before it ended; retry the request.",
            code="job_lost",
        )

    async def submit(self, job: Job, idempotency: Idempotency | None = None) -> str:
        """Write the job's record and append it to its model's stream, in one round trip
        (two more with an Idempotency-Key).

        Returns the id of the job now in charge: ``job``'s, or, when the caller
        sent ``idempotency``'s key before, the job first submitted with it.
        Raises Overloaded (429) when the model's queue is full, Conflict (409)
        when the key came with another request or its job has expired.
        """
        # Rounded up: the job's clock starts a moment after its deadline was set.
        ttl = self.result_ttl_s + math.ceil(job.deadline - job.created_at)
        if idempotency is not None:
            earlier = await claim(self.redis, self.keys, job, ttl, idempotency)
            if earlier is not None:
                return earlier
        entry = await self._enqueue(job, ttl, recorded=idempotency is not None)
        if entry is None:  # the queue is full: the record written first goes again
            cleanup = self.redis.pipeline(transaction=False)
            cleanup.delete(self.keys.job(job.id))
            if idempotency is not None:
                cleanup.delete(self.keys.idempotency(idempotency.caller, idempotency.key))
            await cleanup.execute()
            raise Overloaded(
                f"The queue of model '{job.model}' is full ({self.max_queue_depth} jobs); "
                "retry shortly.",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        return job.id

    async def run(self, job: Job, idempotency: Idempotency | None = None) -> dict[str, Any]:
        """Submit ``job`` with this process as its reply address and wait for its end.

        Returns the reply (see ``parse_reply``), its result the JSON bytes the
        worker wrote, or None. Past the job's deadline DeadlinePassed is raised,
        and the job cancelled if it is this request's own: a job joined through
        an Idempotency-Key belongs to the request that submitted it.
        Unavailable (503) when Redis lost the job.
        """
        waiter = _Waiter(job.deadline)
        job_id = job.id
        self._wait(job_id, waiter)
        try:
            job_id = await self.submit(job, idempotency)
            if job_id != job.id:  # an earlier request with the same key: wait for that job
                self._unwait(job.id, waiter)
                self._wait(job_id, waiter)
            waiter.submitted = True
            try:
                reply = await waiter.future
            except TimeoutError:  # set by the sweeper
                own = job_id == job.id
                if own:
                    await self.cancel(job_id)
                raise DeadlinePassed(job_id, cancelled=own) from None
        finally:
            self._unwait(job_id, waiter)
            if waiter.future.done() and not waiter.future.cancelled():
                waiter.future.exception()  # a deadline met while the submit failed: seen
        if reply["result_apart"]:  # read here: the reply may be shared by several waits
            result = await self.redis.get(self.keys.result(job_id))
            if result is None:
                raise self._lost_error(job_id)
            reply = {**reply, "result": result, "result_apart": False}
        return reply

    def _wait(self, job_id: str, waiter: _Waiter) -> None:
        self._waiting.setdefault(job_id, []).append(waiter)

    def _unwait(self, job_id: str, waiter: _Waiter) -> None:
        waiters = self._waiting.get(job_id, [])
        if waiter in waiters:
            waiters.remove(waiter)
        if not waiters:
            self._waiting.pop(job_id, None)

    async def _enqueue(self, job: Job, ttl: int, recorded: bool = False) -> bytes | None:
        """Write the job's record (unless ``recorded``: written already), then
        append it to its model's stream unless the stream is full: the stream
        entry's id, or None.

        Every job submitted before the event loop's next turn goes in the same
        pipeline, so a burst of requests costs one round trip, not one each; so
        do those submitted while the pipeline before is on the wire.
        """
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._submits.append((job, ttl, recorded, future))
        if len(self._submits) == 1:
            flush = asyncio.create_task(self._flush_submits())
            self._flushes.add(flush)
            flush.add_done_callback(self._flushes.discard)
        return await future

    async def _flush_submits(self) -> None:
        """Send the submits gathered so far in one pipeline; settle every one's future.

        Whatever happens, each future ends resolved or failed: a request waits
        on it with no deadline of its own yet. A job that cannot be encoded
        fails alone, before anything of it is sent; the others go ahead.
        """
        batch: list[tuple[Job, int, bool, asyncio.Future[bytes | None]]] = []
        try:
            # One pipeline on the wire at a time: the submits that come meanwhile
            # gather for the next.
            async with self._flushing:
                batch, self._submits = self._submits, []
                commands: list[tuple[Any, ...]] = []
                sent: list[tuple[int, asyncio.Future[bytes | None]]] = []  # its replies' end
                for job, ttl, recorded, future in batch:
                    try:
                        # Encoded before any of its commands is queued, so that a job that
                        # cannot be sent (a lone surrogate) leaves none in the pipeline.
                        # Every string those commands hold is in this payload too.
                        payload = job.to_json()
                    except (TypeError, ValueError) as exc:  # orjson.JSONEncodeError is both
                        if not future.done():
                            future.set_exception(exc)
                        continue
                    if not recorded:
                        # Not again for a recorded one: a client may have cancelled it meanwhile.
                        key = self.keys.job(job.id)
                        fields = job.hash_fields()
                        commands.append(("HSET", key, *itertools.chain(*fields.items())))
                        commands.append(("EXPIRE", key, ttl))
                    stream = self.keys.stream(job.model)
                    commands.append(
                        script_call(ENQUEUE_SCRIPT, [stream], [self.max_queue_depth, payload])
                    )
                    sent.append((len(commands), future))  # the stream entry's id its last reply
                replies = await self._execute_submits(commands) if sent else []
            start = 0
            for end, future in sent:
                written, start = replies[start:end], end
                if future.done():  # its request went away meanwhile
                    continue
                error = next((reply for reply in written if isinstance(reply, Exception)), None)
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(written[-1])
        except asyncio.CancelledError:
            if not batch:  # stopped while waiting its turn
                batch, self._submits = self._submits, []
            for *_, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # Redis unreachable: every submit not yet settled failed
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)

    async def _execute_submits(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        try:
            async with asyncio.timeout(self.submit_timeout_s):
                return await self.submits.exchange(commands)
        except TimeoutError:
            raise RedisTimeoutError(
                f"Redis did not answer a submit within {self.submit_timeout_s:g} s"
            ) from None

    async def view(self, job_id: str) -> dict[str, Any] | None:
        """The job as `GET /v1/jobs/{id}` shows it; None when unknown or expired.

        A job still queued past its deadline is ended `expired` first: no worker
        may be there to meet its entry and do it.
        """
        record = await read_job(self.redis, self.keys, job_id)
        if record.get(b"status") == JobStatus.QUEUED.value.encode():
            now = time.time()
            if float(record.get(b"deadline", math.inf)) < now:
                args = expire_args(self.keys, job_id, now, self.result_ttl_s)
                if await self._expire(keys=[self.keys.job(job_id)], args=args):
                    logger.info("job expired in the queue", extra={"job_id": job_id})
                    self._tell_webhook(job_id, record.get(b"webhook"))
                record = await read_job(self.redis, self.keys, job_id)
        return job_view(job_id, record)

    def _tell_webhook(self, job_id: str, url: bytes | None) -> None:
        """Deliver the webhook of a job this process ended, if it has one."""
        if url and self.webhooks is not None:
            self.webhooks.send(job_id, url.decode())

    async def _read_outcomes(self, job_ids: list[str]) -> list[dict[str, Any] | None]:
        """Each job's reply as its record holds it; None for a job not yet ended,
        LOST for one with no record."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self.keys.job(job_id), *OUTCOME_FIELDS)
            pipe.get(self.keys.result(job_id))
        read = await pipe.execute()
        replies: list[dict[str, Any] | None] = []
        for job_id, fields, apart in zip(job_ids, read[::2], read[1::2], strict=True):
            status, result, error, started_at, finished_at = cast(list[bytes | None], fields)
            result = result or apart
            if status is None:
                replies.append(LOST)
                continue
            if JobStatus(status.decode()) not in TERMINAL_STATUSES:
                replies.append(None)
                continue
            replies.append(
                {
                    "id": job_id,
                    "status": status.decode(),
                    "result": result or None,
                    "error": orjson.loads(error) if error else None,
                    "started_at": float(started_at) if started_at else None,
                    "finished_at": float(finished_at) if finished_at else None,
                    "result_apart": False,
                }
            )
        return replies

    async def cancel(self, job_id: str) -> bool:
        """End a job as cancelled unless it already ended; workers skip it from then on."""
        error = orjson.dumps(JobError("cancelled by the client", "cancelled").to_dict())
        ended = await self._finish(
            keys=[self.keys.job(job_id)],
            args=[
                JobStatus.CANCELLED.value,
                time.time(),
                self.result_ttl_s,
                b"",
                error,
                "",
                b"",
                self.keys.events(job_id),
            ],
        )
        if ended:
            # A worker running it stops at its next step; the webhook is told here,
            # as the worker's own finish comes second and ends nothing.
            pipe = self.redis.pipeline(transaction=False)
            pipe.publish(self.keys.cancellations(), job_id)
            pipe.hget(self.keys.job(job_id), "webhook")
            _, url = await pipe.execute()
            self._tell_webhook(job_id, url)
        return bool(ended)
