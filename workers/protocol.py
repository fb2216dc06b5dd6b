"""The job protocol shared by the API and the workers.

What a job is, which states it moves through, and where each piece lives in
Redis. Both sides import this module and nothing else of each other, so the
wire format is defined exactly once. Everything on the wire is JSON.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any, cast

import orjson
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub


class JobStatus(StrEnum):
    QUEUED = "queued"  # in the stream, not yet taken by a worker
    RUNNING = "running"  # a worker took it; it may be retried if that worker dies
    SUCCEEDED = "succeeded"  # the result is stored
    FAILED = "failed"  # the error is stored; it will not run again
    CANCELLED = "cancelled"  # a client cancelled it before it finished
    EXPIRED = "expired"  # its deadline passed before a worker finished it


TERMINAL_STATUSES = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED}
)


class JobType(StrEnum):
    EMBEDDINGS = "embeddings"
    IMAGES_GENERATIONS = "images.generations"
    IMAGES_EDITS = "images.edits"
    NOOP = "noop"  # for the no-op model, which measures the queue


CONSUMER_GROUP = "workers"


@dataclass(frozen=True)
class Keys:
    """Redis key names. The part in braces is the hash tag, so that every key a
    single command touches lands in one Redis Cluster slot."""

    namespace: str

    def stream(self, model: str) -> str:
        return f"{self.namespace}:stream:{{{model}}}"

    def job(self, job_id: str) -> str:
        return f"{self.namespace}:job:{{{job_id}}}"

    def replies(self, listener: str) -> str:
        """Pub/sub channel on which one API process hears its jobs finish."""
        return f"{self.namespace}:replies:{listener}"

    def result(self, job_id: str) -> str:
        """A job's result body when it is kept apart from its record (see
        ``RESULT_APART_BYTES``)."""
        return f"{self.namespace}:result:{{{job_id}}}"

    def result_draft(self, job_id: str) -> str:
        """Where a worker writes a large result before FINISH_SCRIPT makes it the
        job's: a name of its own per attempt, so that a late attempt's write never
        touches the result another attempt stored."""
        return f"{self.result(job_id)}:{uuid.uuid4().hex}"

    def events(self, job_id: str) -> str:
        """Pub/sub channel of one job's life: started, progress, its final status."""
        return f"{self.namespace}:events:{{{job_id}}}"

    def cancellations(self) -> str:
        """Pub/sub channel on which workers hear of cancelled jobs."""
        return f"{self.namespace}:cancellations"

    def file(self, file_id: str) -> str:
        """A generated image kept for `GET /v1/files/{id}`."""
        return f"{self.namespace}:file:{{{file_id}}}"

    def idempotency(self, caller: str, key: str) -> str:
        """One caller's ``Idempotency-Key``: the job it was first sent with, and that request."""
        return f"{self.namespace}:idempotency:{{{caller}:{key}}}"

    def dead_letters(self) -> str:
        """Stream of jobs given up on after HEARTH_MAX_ATTEMPTS, with their last error."""
        return f"{self.namespace}:dead-letters"

    def rate_limit(self, caller: str) -> str:
        """Token bucket of one API key (its digest) or client address."""
        return f"{self.namespace}:rate:{{{caller}}}"

    def workers(self) -> str:
        """Hash of live workers: worker id → JSON heartbeat."""
        return f"{self.namespace}:workers"

    def batch_sizes(self, model: str) -> str:
        """Hash of batch size → how many batches of that size a worker ran."""
        return f"{self.namespace}:stats:{{{model}}}:batch-sizes"


# Results larger than this are kept apart from the job's record and travel to
# the waiting API by a read of their own, not inside the published reply: a
# large value through a Lua script and pub/sub costs Redis copies and the
# subscriber writes in pieces (a 270 KB image: 2.5 ms from the worker's store to
# a subscriber holding it, against 1.5 ms this way, on the embedded server), while
# a small one is cheaper in the reply than a second round trip.
RESULT_APART_BYTES = 64 * 1024


def new_job_id() -> str:
    return f"job_{uuid.uuid4().hex}"


@dataclass(frozen=True)
class Job:
    """The envelope a worker receives: what to run, for whom, and until when."""

    type: JobType
    model: str
    input: dict[str, Any]
    deadline: float
    id: str = field(default_factory=new_job_id)
    created_at: float = field(default_factory=time.time)
    reply_to: str | None = None  # the API process waiting for it, if any
    webhook: str | None = None  # URL told of its end

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "id": self.id,
                "type": self.type.value,
                "model": self.model,
                "input": self.input,
                "deadline": self.deadline,
                "created_at": self.created_at,
                "reply_to": self.reply_to,
                "webhook": self.webhook,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> Job:
        data = orjson.loads(raw)
        return cls(
            id=data["id"],
            type=JobType(data["type"]),
            model=data["model"],
            input=data["input"],
            deadline=float(data["deadline"]),
            created_at=float(data["created_at"]),
            reply_to=data.get("reply_to"),
            webhook=data.get("webhook"),
        )

    def with_webhook(self, url: str) -> Job:
        return replace(self, webhook=url)

    def hash_fields(self) -> Mapping[Any, str | float | int]:
        """The job's record in Redis as it is first written, before any worker sees it."""
        fields: dict[str, str | float | int] = {
            "type": self.type.value,
            "model": self.model,
            "status": JobStatus.QUEUED.value,
            "created_at": self.created_at,
            "deadline": self.deadline,
            "attempts": 0,
        }
        if self.webhook:
            fields["webhook"] = self.webhook
        return fields


# The fields every job record holds from its submission on. A record without
# them is not a job: it expired, and at most a late write (a webhook's outcome
# written by an older version of Hearth) is left of it.
CORE_FIELDS = (b"type", b"model", b"status")


def job_view(job_id: str, record: Mapping[bytes, bytes]) -> dict[str, Any] | None:
    """A job as `GET /v1/jobs/{id}`, its events and its webhook show it; None when
    ``record`` is not a whole job (see ``CORE_FIELDS``), which reads as not found."""
    if not all(name in record for name in CORE_FIELDS):
        return None

    def number(name: bytes) -> float | None:
        return float(record[name]) if name in record else None

    def document(name: bytes) -> Any:
        return orjson.loads(record[name]) if name in record else None

    return {
        "id": job_id,
        "object": "job",
        "type": record[b"type"].decode(),
        "model": record[b"model"].decode(),
        "status": record[b"status"].decode(),
        "progress": document(b"progress"),
        "attempts": int(record.get(b"attempts", b"0")),
        "created_at": number(b"created_at"),
        "started_at": number(b"started_at"),
        "finished_at": number(b"finished_at"),
        "webhook": record[b"webhook"].decode() if b"webhook" in record else None,
        "error": document(b"error"),
        "result": document(b"result"),
    }


class InvalidJobInput(ValueError):
    """A job asks for something its model cannot do: it fails as the client's error,
    naming the field at fault (``param``) where there is one, with the code the API
    gives the same fault where it finds it first (``code``)."""

    def __init__(
        self, message: str, param: str | None = None, code: str = "invalid_for_model"
    ) -> None:
        super().__init__(message)
        self.param = param
        self.code = code

    def outcome(self) -> Outcome:
        """The job's end: failed, as the client's error."""
        error = JobError(str(self), "invalid_request_error", self.param, self.code)
        return Outcome(JobStatus.FAILED, error=error)


def absolute_urls(view: dict[str, Any], base_url: str | None) -> dict[str, Any]:
    """Prefix the relative file URLs in a job view's images result with ``base_url``."""
    result = view.get("result")
    if base_url and isinstance(result, dict):
        for item in result.get("data", []):
            if isinstance(item, dict) and str(item.get("url") or "").startswith("/"):
                item["url"] = base_url.rstrip("/") + item["url"]
    return view


@dataclass(frozen=True)
class JobError:
    """Why a job failed; ``type`` follows OpenAI's error types."""

    message: str
    type: str = "server_error"
    param: str | None = None
    code: str | None = None  # the API's error code, where the client's input is at fault

    def to_dict(self) -> dict[str, str | None]:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}


# Why a job nobody finished before its deadline ended `expired`.
EXPIRED_ERROR = JobError("the deadline passed before a worker could run the job", "timeout")


@dataclass(frozen=True)
class Outcome:
    """A finished job: its terminal status with either the result body or the error."""

    status: JobStatus
    result: bytes | None = None  # the JSON body the synchronous route answers with
    error: JobError | None = None
    files: dict[str, bytes] = field(default_factory=dict)  # file id → PNG, for url results
    retryable: bool = False  # a failure another attempt may not repeat (not the input's fault)


def reply_head(
    job_id: str,
    outcome: Outcome,
    started_at: float | None,
    finished_at: float,
    result_apart: bool = False,
) -> bytes:
    """The start of what a worker publishes on the API's reply channel once a job
    is stored: the reply without its result, as one line of JSON. FINISH_SCRIPT
    appends the result it stores in the record (nothing when there is none), so
    the result travels to Redis once, and the API can answer with its bytes as
    they are. ``result_apart``: the result is kept apart instead (see
    ``RESULT_APART_BYTES``), for the API to read."""
    head = orjson.dumps(
        {
            "id": job_id,
            "status": outcome.status.value,
            "error": outcome.error.to_dict() if outcome.error else None,
            "started_at": started_at,
            "finished_at": finished_at,
            "result_apart": result_apart,
        }
    )
    return head + b"\n"


def parse_reply(message: bytes) -> dict[str, Any]:
    """A reply as published (see ``reply_head``): ``{"id", "status", "error",
    "started_at", "finished_at", "result_apart", "result"}``, the result left as
    the JSON bytes the worker wrote, or None (always None where ``result_apart``).
    orjson writes no raw newline, so the first one ends the head."""
    head, _, result = message.partition(b"\n")
    reply: dict[str, Any] = orjson.loads(head)
    reply["result"] = result or None
    reply.setdefault("result_apart", False)
    return reply


async def read_job(redis: Redis, keys: Keys, job_id: str) -> dict[bytes, bytes]:
    """A job's record, its result in it wherever it is kept (see ``RESULT_APART_BYTES``):
    what ``job_view`` shows. Empty when the job is unknown or expired."""
    pipe = redis.pipeline(transaction=False)
    pipe.hgetall(keys.job(job_id))
    pipe.get(keys.result(job_id))
    record, result = await pipe.execute()
    if result is not None and record:
        record[b"result"] = result
    return cast(dict[bytes, bytes], record)


async def _as_received(message: Any) -> Any:
    return message


def listener(redis: Redis) -> PubSub:
    """A pub/sub connection that skips subscribe confirmations and hands each
    message on as it came.

    redis-py's own handler of pushed messages builds a debug line of the whole
    message before the logger decides whether to keep it: 1.6 ms for the 200 KB
    reply of a 256x256 image, 0.3 ms without it.
    """
    return redis.pubsub(ignore_subscribe_messages=True, push_handler_func=_as_received)


def script_call(source: str, keys: list[str], args: list[Any]) -> tuple[Any, ...]:
    """The command that runs a Lua script: EVAL with its source.

    Redis keeps compiled scripts by their digest, so sending the source again
    costs little; a script registered with redis-py would instead make every
    pipeline that holds it ask Redis first whether it is loaded (one more round
    trip), and could meet NOSCRIPT after a Redis restart.
    """
    return ("EVAL", source, len(keys), *keys, *args)


def queue_script(pipe: Any, source: str, keys: list[str], args: list[Any]) -> None:
    """Queue a Lua script on a pipeline (see ``script_call``)."""
    pipe.execute_command(*script_call(source, keys, args))


class Line:
    """One connection to Redis, held by one user at a time (a worker's batch: the
    event loop sends its marking, the inference thread reads the answer and
    sends the store), for commands sent at once and answered later.

    Commands are gathered on a ``pipeline()`` (which only records them) and
    ``send`` puts them on the wire; the ``Sent`` it returns reads their replies
    when asked, so a round trip can overlap other work. Unlike a client's pool,
    the line does no bookkeeping per use (taking a pooled connection and giving
    it back, traced on a 2-core machine: 0.03-0.05 ms each time a lone image
    request's batch did). It checks what the pool checks before lending a
    connection: one the server closed (a restart) is opened again before sending.
    """

    def __init__(self, url: str, **options: Any) -> None:
        # The client builds commands for pipelines; its own pool is never used.
        self._client = redis.Redis.from_url(url, **options)
        pool = self._client.connection_pool
        self._connection = pool.connection_class(**pool.connection_kwargs)

    def pipeline(self) -> Any:
        """Where to gather the commands of one ``send``."""
        return self._client.pipeline(transaction=False)

    def send(self, pipe: Any) -> Sent:
        """Send the commands gathered on ``pipe``; their replies are read from the result."""
        connection = self._connection
        commands = [args for args, _options in pipe.command_stack]
        try:
            stale = connection.can_read()  # connects first when not connected
        except (RedisConnectionError, RedisTimeoutError, OSError):  # closed by the server
            stale = True
        if stale:
            connection.disconnect()
        packed = connection.pack_commands(commands)
        if len(packed) > 1:
            # One write for them all. redis-py packs a command with a long argument
            # (a result) apart from those around it and writes each piece on its
            # own. Redis, woken by the first write, ran ahead of this thread, and
            # so did the API and the client it answered; the second write waited
            # for them all. Behind a demo-dit 64x64 image's FINISH, its XACK came
            # 2.6 ms later at the median, 58 µs in one write (Redis's MONITOR).
            packed = [b"".join(packed)]
        try:
            connection.send_packed_command(packed)
        except BaseException:
            connection.disconnect()
            raise
        return Sent(connection, len(commands))

    def close(self) -> None:
        self._connection.disconnect()
        self._client.close()


class Sent:
    """Commands on the wire (see ``Line.send``): read their replies, or abandon them."""

    def __init__(self, connection: Any, count: int) -> None:
        self._connection = connection
        self._count = count

    def replies(self) -> list[Any]:
        """Every command's reply, in order; raises the first error reply, once all are read."""
        replies: list[Any] = []
        try:
            for _command in range(self._count):
                try:
                    replies.append(self._connection.read_response())
                except ResponseError as exc:
                    replies.append(exc)
        except BaseException:
            self._connection.disconnect()  # replies left unread: it must not be used again
            raise
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise reply
        return replies

    def abandon(self) -> None:
        """Drop the connection with its unread replies; the line opens a new one."""
        self._connection.disconnect()


class HeldConnection:
    """One connection of an asyncio client, held by its user for exchanges made
    one at a time (the API's submits, a worker's blocking reads): commands packed
    and sent at once, their replies read straight from the connection.

    Taking a connection from the pool and giving it back (with its checks and
    bookkeeping) and redis-py's command and pipeline layers cost a lone request
    more than the round trip itself on a 2-core machine. The checks that matter
    stay: a connection the server closed (a restart) is opened again before
    sending, a connection error is retried as the client's retry policy says,
    and an exchange that fails or is cancelled midway closes the connection, so
    that none of its replies is read later as another's.
    """

    def __init__(self, client: Redis) -> None:
        pool = client.connection_pool
        self._connection = pool.connection_class(**pool.connection_kwargs)

    async def exchange(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` at once; their replies in order, an error reply as its
        exception. Raw replies: no command's response callback is applied."""
        connection = self._connection
        try:
            replies: list[Any] = await connection.retry.call_with_retry(
                lambda: self._exchange(commands), lambda _error: connection.disconnect()
            )
        except BaseException:
            await connection.disconnect(nowait=True)  # replies may still come
            raise
        return replies

    async def _exchange(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        connection = self._connection
        await connection.connect()  # type: ignore[no-untyped-call]  # at once when connected
        try:
            stale = await connection.can_read()
        except (RedisConnectionError, RedisTimeoutError, OSError):
            stale = True
        if stale:  # closed by the server, or holding what nobody asked for
            await connection.disconnect()
            await connection.connect()  # type: ignore[no-untyped-call]
        await connection.send_packed_command(connection.pack_commands(commands))
        replies: list[Any] = []
        for _command in commands:
            try:
                replies.append(await connection.read_response())
            except ResponseError as exc:
                replies.append(exc)
        return replies

    async def close(self) -> None:
        await self._connection.disconnect()


# Scripts keep status changes atomic per job, so that a redelivered or late
# worker never flips a terminal status and a cancelled job never starts.

# KEYS[1] job hash; ARGV: now, events channel, worker name, lease seconds.
# Returns {status, attempts, last error} after the attempt, and announces the
# start on the job's events channel. A job found running was taken over from a
# worker that went silent; one running under another worker whose lease has not
# run out is left to it ('busy'). The lease is kept on Redis's clock, so workers
# with skewed clocks agree on it.
START_SCRIPT = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', 0, ''} end
if status ~= 'queued' and status ~= 'running' then return {status, 0, ''} end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
if status == 'running' then
  local holder = redis.call('HGET', KEYS[1], 'worker')
  local lease = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0')
  if holder and holder ~= ARGV[3] and lease > now then return {'busy', 0, ''} end
end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1], 'worker', ARGV[3],
  'lease_until', tostring(now + tonumber(ARGV[4])))
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('PUBLISH', ARGV[2], '{"event":"started","attempts":' .. attempts .. '}')
return {'running', attempts, redis.call('HGET', KEYS[1], 'last_error') or ''}
"""

# KEYS[1] job hash; ARGV: worker name, lease seconds. Extends the lease of a
# job this worker is running (see START_SCRIPT); returns 0 for any other job.
LEASE_SCRIPT = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return 0 end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
redis.call('HSET', KEYS[1], 'lease_until', tostring(now + tonumber(ARGV[2])))
return 1
"""

# KEYS[1] job hash; ARGV: progress JSON, events channel, event. Records and
# announces progress of a running job only, so a late report never outlives
# (or recreates) the record of a job that has ended.
PROGRESS_SCRIPT = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'progress', ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""

# KEYS[1] model stream; ARGV: most entries it may hold, job JSON. Appends the
# job unless the stream is full (backpressure); returns the entry id or nil.
# The job's record is written before, by commands of its own: a script touches
# the keys of one hash tag only, as Redis Cluster requires.
ENQUEUE_SCRIPT = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
return redis.call('XADD', KEYS[1], '*', 'job', ARGV[2])
"""

# KEYS[1] job hash; ARGV: error JSON. Puts a running job back in the queue
# after a failed attempt, keeping its error for the record.
RETRY_SCRIPT = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued', 'last_error', ARGV[1])
return 1
"""

# KEYS[1] job hash, and for a result kept apart (see RESULT_APART_BYTES) KEYS[2]
# its draft (Keys.result_draft, written just before) and KEYS[3] the job's
# result key; ARGV: status, now, ttl, result (to keep in the record), error,
# reply channel, reply head (see reply_head), events channel. Returns 1 when
# this call set the terminal status (and published the reply and the final
# event), 0 when the job had already ended or is gone: its draft is dropped. A
# draft gone missing (Redis lost it) fails the call before it writes anything,
# so the job stays to be run again.
FINISH_SCRIPT = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == 'succeeded' or status == 'failed' or status == 'cancelled'
    or status == 'expired' then
  if KEYS[2] then redis.call('DEL', KEYS[2]) end
  return 0
end
if KEYS[2] and redis.call('EXISTS', KEYS[2]) == 0 then
  return redis.error_reply('HEARTH the result draft ' .. KEYS[2] .. ' is missing')
end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished_at', ARGV[2])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'result', ARGV[4]) end
if KEYS[2] then
  redis.call('RENAME', KEYS[2], KEYS[3])
  redis.call('EXPIRE', KEYS[3], ARGV[3])
end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[5]) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
if ARGV[6] ~= '' then redis.call('PUBLISH', ARGV[6], ARGV[7] .. ARGV[4]) end
redis.call('PUBLISH', ARGV[8], '{"event":"' .. ARGV[1] .. '"}')
return 1
"""


def queue_finish(
    pipe: Any,
    keys: Keys,
    job: Job,
    outcome: Outcome,
    ttl: int,
    started: float | None,
    now: float,
) -> int:
    """Queue on ``pipe`` what ends ``job`` with ``outcome`` (FINISH_SCRIPT, after
    the draft of a result kept apart), its record and result kept ``ttl`` seconds.
    Returns where, among the pipeline's replies, FINISH_SCRIPT's lands: 1 there
    when this outcome ended the job."""
    script_keys, kept = [keys.job(job.id)], outcome.result or b""
    apart = len(kept) > RESULT_APART_BYTES
    if apart:  # written by a plain command, made the job's by the script
        draft = keys.result_draft(job.id)
        pipe.set(draft, kept, ex=ttl)
        script_keys += [draft, keys.result(job.id)]
        kept = b""
    error = orjson.dumps(outcome.error.to_dict()) if outcome.error else b""
    index = len(pipe)
    queue_script(
        pipe,
        FINISH_SCRIPT,
        script_keys,
        [
            outcome.status.value,
            now,
            ttl,
            kept,
            error,
            job.reply_to or "",
            reply_head(job.id, outcome, started, now, apart) if job.reply_to else b"",
            keys.events(job.id),
        ],
    )
    return index


# KEYS[1] job hash; ARGV: now, ttl, error JSON, events channel, reply channel,
# reply (see reply_head). Ends a queued job whose deadline has passed as
# expired, the way FINISH_SCRIPT ends a job: its error, finished_at, a record
# kept ttl seconds from now, the reply and the final event. Whoever meets the
# job first runs it: the API reading it, or a worker taking its entry. Returns
# 1 when this call ended the job, 0 when it is not queued, not yet due, or gone.
EXPIRE_SCRIPT = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
local deadline = redis.call('HGET', KEYS[1], 'deadline')
if not deadline or tonumber(deadline) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'status', 'expired', 'finished_at', ARGV[1], 'error', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[2])
if ARGV[5] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[6]) end
redis.call('PUBLISH', ARGV[4], '{"event":"expired"}')
return 1
"""


def expire_args(
    keys: Keys, job_id: str, now: float, ttl: int, reply_to: str | None = None
) -> list[Any]:
    """EXPIRE_SCRIPT's arguments, the same whether the API or a worker expires the job."""
    outcome = Outcome(JobStatus.EXPIRED, error=EXPIRED_ERROR)
    return [
        now,
        ttl,
        orjson.dumps(EXPIRED_ERROR.to_dict()),
        keys.events(job_id),
        reply_to or "",
        reply_head(job_id, outcome, None, now) if reply_to else b"",
    ]


# KEYS[1] job hash; ARGV: how its webhook delivery went. Written only while the
# record exists: HSET keeps an existing key's TTL, but on a record that expired
# during the delivery it would create a bare hash that never expires.
WEBHOOK_STATUS_SCRIPT = """
if redis.call('HEXISTS', KEYS[1], 'status') == 0 then return 0 end
redis.call('HSET', KEYS[1], 'webhook_status', ARGV[1])
return 1
"""
