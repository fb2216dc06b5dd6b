"""Puts jobs on model streams and hands each waiting request its outcome.

One dispatcher per API process. It subscribes once to its own reply channel;
workers publish there when a job it submitted ends, and the listener resolves
the waiting request's future, so a waiting request costs no Redis traffic.
Should a reply be missed (a dropped connection), the waiter reads the job's
record once per ``POLL_S`` and finds the outcome there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import replace
from typing import Any, cast

import orjson
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.errors import Overloaded
from workers.protocol import (
    FINISH_SCRIPT,
    SUBMIT_SCRIPT,
    TERMINAL_STATUSES,
    Job,
    JobStatus,
    Keys,
    job_view,
    parse_reply,
)

logger = logging.getLogger(__name__)

POLL_S = 1.0


class Dispatcher:
    def __init__(self, redis: Redis, keys: Keys, result_ttl_s: int, max_queue_depth: int) -> None:
        self.redis = redis
        self.keys = keys
        self.result_ttl_s = result_ttl_s
        self.max_queue_depth = max_queue_depth
        self.channel = keys.replies(uuid.uuid4().hex)
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._finish = redis.register_script(FINISH_SCRIPT)

    async def start(self) -> None:
        self._listener = asyncio.create_task(self._listen(), name="reply-listener")

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener

    async def _listen(self) -> None:
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                while True:
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
        future = self._waiting.get(reply["id"])
        if future is not None and not future.done():
            future.set_result(reply)

    async def submit(self, job: Job, idempotency_key: str | None = None) -> str:
        """Write the job's record and append it to its model's stream, in one step.

        Returns the id of the job now in charge: ``job``'s, or, when
        ``idempotency_key`` was seen before, the job first submitted with it.
        Raises Overloaded (429) when the model's queue is full.
        """
        ttl = self.result_ttl_s + int(job.deadline - job.created_at)
        if idempotency_key is not None:
            earlier = await self.redis.set(
                self.keys.idempotency(idempotency_key), job.id, nx=True, ex=ttl, get=True
            )
            if earlier is not None:
                return cast(bytes, earlier).decode()
        fields = [item for pair in job.hash_fields().items() for item in pair]
        entry = await self.redis.eval(
            SUBMIT_SCRIPT,
            2,
            self.keys.job(job.id),
            self.keys.stream(job.model),
            self.max_queue_depth,
            ttl,
            job.to_json(),
            *fields,
        )
        if entry is None:
            if idempotency_key is not None:
                await self.redis.delete(self.keys.idempotency(idempotency_key))
            raise Overloaded(
                f"The queue of model '{job.model}' is full ({self.max_queue_depth} jobs); "
                "retry shortly.",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        return job.id

    async def run(self, job: Job, idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit ``job`` with this process as its reply address and wait for its end.

        Returns the reply (see ``parse_reply``), its result the JSON bytes the
        worker wrote, or None. Past the job's deadline the job is cancelled and
        TimeoutError raised.
        """
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[job.id] = future
        try:
            job_id = await self.submit(job, idempotency_key)
            if job_id != job.id:  # an earlier request with the same key: wait for that job
                self._waiting[job_id] = self._waiting.pop(job.id)
                job = replace(job, id=job_id)
            while True:
                remaining = job.deadline - time.time()
                if remaining <= 0:
                    await self.cancel(job.id)
                    raise TimeoutError(job.id)
                try:
                    return await asyncio.wait_for(asyncio.shield(future), min(POLL_S, remaining))
                except TimeoutError:
                    reply = await self._read_outcome(job.id)
                    if reply is not None:
                        return reply
        finally:
            self._waiting.pop(job.id, None)

    async def view(self, job_id: str) -> dict[str, Any] | None:
        """The job as `GET /v1/jobs/{id}` shows it; None when unknown or expired."""
        record = cast(dict[bytes, bytes], await self.redis.hgetall(self.keys.job(job_id)))
        return job_view(job_id, record) if record else None

    async def _read_outcome(self, job_id: str) -> dict[str, Any] | None:
        fields = await self.redis.hmget(
            self.keys.job(job_id), "status", "result", "error", "started_at", "finished_at"
        )
        status, result, error, started_at, finished_at = cast(list[bytes | None], fields)
        if status is None or JobStatus(status.decode()) not in TERMINAL_STATUSES:
            return None
        return {
            "id": job_id,
            "status": status.decode(),
            "result": result or None,
            "error": orjson.loads(error) if error else None,
            "started_at": float(started_at) if started_at else None,
            "finished_at": float(finished_at) if finished_at else None,
        }

    async def cancel(self, job_id: str) -> bool:
        """End a job as cancelled unless it already ended; workers skip it from then on."""
        error = orjson.dumps(
            {"message": "cancelled by the client", "type": "cancelled", "param": None}
        )
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
            # A worker running it stops at its next step.
            await self.redis.publish(self.keys.cancellations(), job_id)
        return bool(ended)
