"""The job envelope and the status scripts, against a real Redis."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis
from redis.asyncio import Redis as AsyncRedis
from redis.crc import key_slot

from app.auth import TOKEN_BUCKET_SCRIPT
from tests.support import run_on_own_thread
from workers import protocol
from workers.protocol import (
    ENQUEUE_SCRIPT,
    EXPIRE_SCRIPT,
    FINISH_SCRIPT,
    LEASE_SCRIPT,
    RETRY_SCRIPT,
    START_SCRIPT,
    TERMINAL_STATUSES,
    WEBHOOK_STATUS_SCRIPT,
    HeldConnection,
    Job,
    JobError,
    JobStatus,
    JobType,
    Keys,
    Line,
    Outcome,
    expire_args,
    job_view,
    listener,
    parse_reply,
    queue_script,
    reply_head,
)
from workers.worker import _read_entries


def make_job(**overrides: object) -> Job:
    fields: dict[str, object] = {
        "type": JobType.EMBEDDINGS,
        "model": "all-minilm-l6-v2",
        "input": {"input": ["héllo"], "encoding_format": "float", "dimensions": None},
        "deadline": time.time() + 60,
        "reply_to": "hearth:replies:abc",
    }
    fields.update(overrides)
    return Job(**fields)  # type: ignore[arg-type]


def test_job_survives_the_wire() -> None:
    job = make_job()
    assert Job.from_json(job.to_json()) == job


def test_job_ids_are_unique() -> None:
    assert make_job().id != make_job().id


def test_terminal_statuses_are_the_ends() -> None:
    assert {JobStatus.QUEUED, JobStatus.RUNNING}.isdisjoint(TERMINAL_STATUSES)
    assert len(TERMINAL_STATUSES) == len(JobStatus) - 2


def test_keys_share_a_hash_tag_per_model_and_job() -> None:
    keys = Keys("ns")
    assert keys.stream("m1") == "ns:stream:{m1}"
    assert keys.job("job_1") == "ns:job:{job_1}"
    assert keys.batch_sizes("m1").startswith("ns:stats:{m1}")


def test_the_reply_is_the_head_then_the_stored_result(
    redis_client: redis.Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    finish = redis_client.register_script(FINISH_SCRIPT)
    channel = f"{namespace}:replies:test"
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel)
    pubsub.get_message(timeout=1)
    # A result whose strings hold newlines and the reply's own key names.
    result = orjson.dumps({"object": "list", "text": 'two\nlines, "result": {}'})
    succeeded = Outcome(JobStatus.SUCCEEDED, result=result)
    failed = Outcome(JobStatus.FAILED, error=JobError("boom\nagain"))
    replies = []
    for outcome, started in ((succeeded, 1.0), (failed, None)):
        job = make_job()
        key = _seed(redis_client, keys, job)
        head = reply_head(job.id, outcome, started, 2.0)
        error = orjson.dumps(outcome.error.to_dict()) if outcome.error else b""
        args = [outcome.status.value, 2.0, 60, outcome.result or b"", error, channel, head]
        assert finish(keys=[key], args=[*args, keys.events(job.id)]) == 1
        message = pubsub.get_message(timeout=2)
        assert message is not None
        replies.append((job.id, parse_reply(message["data"])))
    pubsub.close()
    (first_id, first), (second_id, second) = replies
    # The result comes back byte for byte as the worker wrote it.
    assert first == {
        "id": first_id,
        "status": "succeeded",
        "result": result,
        "error": None,
        "started_at": 1.0,
        "finished_at": 2.0,
        "result_apart": False,
    }
    assert second["id"] == second_id
    assert second["result"] is None
    assert second["error"]["message"] == "boom\nagain"


def test_enqueue_appends_only_while_the_stream_has_room(
    redis_client: redis.Redis, namespace: str
) -> None:
    stream = Keys(namespace).stream("m1")
    enqueue = redis_client.register_script(ENQUEUE_SCRIPT)
    first, second = make_job(), make_job()
    assert enqueue(keys=[stream], args=[1, first.to_json()]) is not None
    assert enqueue(keys=[stream], args=[1, second.to_json()]) is None
    ((_entry_id, fields),) = redis_client.xrange(stream)
    assert Job.from_json(fields[b"job"]) == first


def _seed(client: redis.Redis, keys: Keys, job: Job) -> str:
    key = keys.job(job.id)
    client.hset(key, mapping=job.hash_fields())  # type: ignore[arg-type]
    return key


def test_start_counts_attempts_and_skips_ended_jobs(
    redis_client: redis.Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    start = redis_client.register_script(START_SCRIPT)
    retry = redis_client.register_script(RETRY_SCRIPT)
    key = _seed(redis_client, keys, make_job())
    events = keys.events("job")
    assert start(keys=[key], args=[time.time(), events, "w1", 60]) == [b"running", 1, b""]
    # A failed attempt goes back to the queue, its error kept for the next start.
    assert retry(keys=[key], args=[b'{"message":"boom"}']) == 1
    assert redis_client.hget(key, "status") == b"queued"
    again = start(keys=[key], args=[time.time(), events, "w1", 60])
    assert again == [b"running", 2, b'{"message":"boom"}']
    redis_client.hset(key, "status", "cancelled")
    assert start(keys=[key], args=[time.time(), events, "w1", 60]) == [b"cancelled", 0, b""]
    assert retry(keys=[key], args=[b"{}"]) == 0  # only a running job is put back
    missing = keys.job("job_missing")
    assert start(keys=[missing], args=[time.time(), events, "w1", 60]) == [b"missing", 0, b""]


def test_start_leaves_a_job_to_the_live_worker_running_it(
    redis_client: redis.Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    start = redis_client.register_script(START_SCRIPT)
    lease = redis_client.register_script(LEASE_SCRIPT)
    key = _seed(redis_client, keys, make_job())
    events = keys.events("job")
    assert start(keys=[key], args=[time.time(), events, "w1", 0.5]) == [b"running", 1, b""]
    # Another worker that meets the entry while w1's lease runs leaves it alone.
    assert start(keys=[key], args=[time.time(), events, "w2", 0.5]) == [b"busy", 0, b""]
    assert redis_client.hget(key, "worker") == b"w1"
    assert lease(keys=[key], args=["w2", 0.5]) == 0  # only the holder extends it
    assert lease(keys=[key], args=["w1", 0.5]) == 1
    time.sleep(0.3)
    assert start(keys=[key], args=[time.time(), events, "w2", 0.5])[0] == b"busy"
    time.sleep(0.4)  # w1 went silent: its lease ran out, the job is taken over
    assert start(keys=[key], args=[time.time(), events, "w2", 0.5]) == [b"running", 2, b""]
    assert redis_client.hget(key, "worker") == b"w2"
    # A worker restarted under its own name takes its running job back at once.
    assert start(keys=[key], args=[time.time(), events, "w2", 0.5]) == [b"running", 3, b""]


def test_finish_never_flips_a_terminal_status(redis_client: redis.Redis, namespace: str) -> None:
    keys = Keys(namespace)
    finish = redis_client.register_script(FINISH_SCRIPT)
    key = _seed(redis_client, keys, make_job())
    channel = f"{namespace}:replies:test"
    events = keys.events("job")
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel)
    pubsub.get_message(timeout=1)

    assert (
        finish(
            keys=[key],
            args=["succeeded", 1.0, 60, b'{"a":1}', b"", channel, b'{"n":1}\n', events],
        )
        == 1
    )
    assert (
        finish(
            keys=[key],
            args=["failed", 2.0, 60, b"", b'{"message":"x"}', channel, b'{"n":2}\n', events],
        )
        == 0
    )

    record = redis_client.hgetall(key)
    assert record[b"status"] == b"succeeded"
    assert record[b"result"] == b'{"a":1}'
    assert b"error" not in record
    assert 0 < redis_client.ttl(key) <= 60
    message = pubsub.get_message(timeout=2)
    assert message is not None and message["data"] == b'{"n":1}\n{"a":1}'
    assert pubsub.get_message(timeout=0.3) is None  # the refused finish published nothing
    pubsub.close()


def _running(client: redis.Redis, keys: Keys, reply_to: str | None = None) -> tuple[Job, str]:
    """A job a worker is running: the job and its record's key."""
    job = make_job(reply_to=reply_to)
    key = _seed(client, keys, job)
    client.hset(key, "status", "running")
    return job, key


def _finish_through_pipeline(
    client: redis.Redis, keys: Keys, job: Job, outcome: Outcome, now: float = 2.0
) -> int:
    """What a worker's store sends to end ``job``; FINISH_SCRIPT's reply."""
    pipe = client.pipeline(transaction=False)
    index = protocol.queue_finish(pipe, keys, job, outcome, 60, 1.0, now)
    return int(pipe.execute()[index])


def test_a_large_result_is_kept_apart_and_the_reply_says_so(
    redis_url: str, redis_client: redis.Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    channel = f"{namespace}:replies:test"
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel)
    pubsub.get_message(timeout=1)
    large = orjson.dumps({"data": [{"b64_json": "A" * protocol.RESULT_APART_BYTES}]})
    job, key = _running(redis_client, keys, channel)
    outcome = Outcome(JobStatus.SUCCEEDED, result=large)

    assert _finish_through_pipeline(redis_client, keys, job, outcome) == 1
    message = pubsub.get_message(timeout=2)
    assert message is not None
    reply = parse_reply(message["data"])
    assert reply["status"] == "succeeded"
    assert reply["result_apart"] is True
    assert reply["result"] is None
    assert len(message["data"]) < 1024  # the reply carries no result
    record = redis_client.hgetall(key)
    assert record[b"status"] == b"succeeded"
    assert b"result" not in record
    assert redis_client.get(keys.result(job.id)) == large
    assert 0 < redis_client.ttl(keys.result(job.id)) <= 60
    assert 0 < redis_client.ttl(key) <= 60
    assert list(redis_client.scan_iter(match=f"{keys.result(job.id)}:*")) == []  # no draft left

    # Readers of the record see the result wherever it is kept.
    async def read() -> dict[bytes, bytes]:
        client = AsyncRedis.from_url(redis_url)
        try:
            return await protocol.read_job(client, keys, job.id)
        finally:
            await client.aclose()

    view = job_view(job.id, run_on_own_thread(read))
    assert view is not None and view["result"] == orjson.loads(large)

    # A small result stays in the record and in the reply, as before.
    small, key = _running(redis_client, keys, channel)
    done = Outcome(JobStatus.SUCCEEDED, result=b'{"data":[]}')
    assert _finish_through_pipeline(redis_client, keys, small, done) == 1
    message = pubsub.get_message(timeout=2)
    assert message is not None
    assert parse_reply(message["data"])["result"] == b'{"data":[]}'
    assert redis_client.hget(key, "result") == b'{"data":[]}'
    assert not redis_client.exists(keys.result(small.id))
    pubsub.close()


def test_a_late_large_result_leaves_the_stored_one_alone(
    redis_client: redis.Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    job, _key = _running(redis_client, keys)
    first = b'"' + b"1" * protocol.RESULT_APART_BYTES + b'"'
    late = b'"' + b"2" * protocol.RESULT_APART_BYTES + b'"'
    assert (
        _finish_through_pipeline(redis_client, keys, job, Outcome(JobStatus.SUCCEEDED, first)) == 1
    )
    # Another attempt finishing after it (a worker taken over while it hung).
    assert (
        _finish_through_pipeline(redis_client, keys, job, Outcome(JobStatus.SUCCEEDED, late)) == 0
    )
    assert redis_client.get(keys.result(job.id)) == first
    assert list(redis_client.scan_iter(match=f"{keys.result(job.id)}:*")) == []  # its draft dropped
    # And a job whose record is gone keeps nothing of it.
    gone = make_job(reply_to=None)
    assert (
        _finish_through_pipeline(redis_client, keys, gone, Outcome(JobStatus.SUCCEEDED, late)) == 0
    )
    assert list(redis_client.scan_iter(match=f"{keys.result(gone.id)}*")) == []
    assert not redis_client.exists(keys.job(gone.id))


def test_finish_with_its_draft_missing_fails_before_it_writes(
    redis_client: redis.Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    job, key = _running(redis_client, keys)
    draft = keys.result_draft(job.id)  # never written: Redis lost it
    args = ["succeeded", 2.0, 60, b"", b"", "", b"", keys.events(job.id)]
    with pytest.raises(redis.ResponseError, match="result draft"):
        redis_client.eval(FINISH_SCRIPT, 3, key, draft, keys.result(job.id), *args)
    record = redis_client.hgetall(key)
    assert record[b"status"] == b"running"  # left to be run again
    assert b"finished_at" not in record
    assert redis_client.ttl(key) == -1


def test_finish_does_not_recreate_an_expired_record(
    redis_client: redis.Redis, namespace: str
) -> None:
    finish = redis_client.register_script(FINISH_SCRIPT)
    key = Keys(namespace).job("job_gone")
    events = Keys(namespace).events("job_gone")
    assert finish(keys=[key], args=["succeeded", 1.0, 60, b"{}", b"", "", b"", events]) == 0
    assert not redis_client.exists(key)


def test_expire_ends_only_a_queued_job_past_its_deadline(
    redis_client: redis.Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    expire = redis_client.register_script(EXPIRE_SCRIPT)
    start = redis_client.register_script(START_SCRIPT)
    late = make_job(deadline=time.time() - 1)
    key = _seed(redis_client, keys, late)
    redis_client.expire(key, 3600)
    channel = f"{namespace}:replies:test"
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel, keys.events(late.id))
    for _ in range(2):
        pubsub.get_message(timeout=1)

    now = time.time()
    assert expire(keys=[key], args=expire_args(keys, late.id, now, 60, channel)) == 1
    record = redis_client.hgetall(key)
    assert record[b"status"] == b"expired"
    assert float(record[b"finished_at"]) == now
    assert orjson.loads(record[b"error"])["type"] == "timeout"
    assert b"started_at" not in record and record[b"attempts"] == b"0"  # it never ran
    assert 0 < redis_client.ttl(key) <= 60  # kept like any ended job, from its end
    reply, event = pubsub.get_message(timeout=2), pubsub.get_message(timeout=2)
    assert reply is not None and event is not None
    assert parse_reply(reply["data"])["status"] == "expired"
    assert orjson.loads(event["data"]) == {"event": "expired"}
    pubsub.close()
    # Once ended it stays so: a second expiry and a worker's start change nothing.
    assert expire(keys=[key], args=expire_args(keys, late.id, time.time(), 60)) == 0
    assert start(keys=[key], args=[time.time(), keys.events(late.id)])[0] == b"expired"

    due_later = make_job(deadline=time.time() + 60)
    key = _seed(redis_client, keys, due_later)
    assert expire(keys=[key], args=expire_args(keys, due_later.id, time.time(), 60)) == 0
    running = make_job(deadline=time.time() - 1)
    key = _seed(redis_client, keys, running)
    redis_client.hset(key, "status", "running")
    assert expire(keys=[key], args=expire_args(keys, running.id, time.time(), 60)) == 0
    gone = keys.job("job_gone")
    assert expire(keys=[gone], args=expire_args(keys, "job_gone", time.time(), 60)) == 0
    assert not redis_client.exists(gone)


def test_a_webhook_status_is_noted_only_on_a_record_that_exists(
    redis_client: redis.Redis, namespace: str
) -> None:
    note = redis_client.register_script(WEBHOOK_STATUS_SCRIPT)
    key = _seed(redis_client, Keys(namespace), make_job())
    redis_client.expire(key, 60)
    assert note(keys=[key], args=["delivered"]) == 1
    assert redis_client.hget(key, "webhook_status") == b"delivered"
    assert 0 < redis_client.ttl(key) <= 60  # the record's TTL is kept
    gone = Keys(namespace).job("job_gone")
    assert note(keys=[gone], args=["failed"]) == 0
    assert not redis_client.exists(gone)  # no bare hash, living forever


def test_a_record_without_its_core_fields_is_no_job() -> None:
    job = make_job()
    record = {key.encode(): str(value).encode() for key, value in job.hash_fields().items()}
    view = job_view(job.id, record)
    assert view is not None and view["status"] == "queued"
    assert job_view(job.id, {}) is None
    # What a webhook delivery that outlived the record used to leave behind.
    assert job_view(job.id, {b"webhook_status": b"failed"}) is None


def test_every_script_touches_the_keys_of_one_hash_tag() -> None:
    # Redis Cluster runs a script only when all its keys share a slot; each of
    # Hearth's scripts takes a single key but FINISH_SCRIPT, whose three are one
    # job's, and the key names carry the tag.
    scripts = {
        name: source
        for name, source in vars(protocol).items()
        if name.endswith("_SCRIPT") and isinstance(source, str)
    }
    scripts["TOKEN_BUCKET_SCRIPT"] = TOKEN_BUCKET_SCRIPT
    assert len(scripts) >= 6
    for name, source in scripts.items():
        assert "KEYS[1]" in source, name
        assert "KEYS[2]" not in source or name == "FINISH_SCRIPT", name
        assert "KEYS[4]" not in source, name
    keys = Keys("ns")
    finish_keys = [keys.job("job_1"), keys.result_draft("job_1"), keys.result("job_1")]
    assert {key_slot(key.encode()) for key in finish_keys} == {key_slot(b"{job_1}")}


def test_a_listener_hands_a_large_message_on_without_formatting_it(
    redis_url: str, redis_client: redis.Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    # redis-py's default handler logs every pushed message at debug level, the
    # whole message formatted first; the listener's handler does neither.
    channel = Keys(namespace).replies("listener-test")
    message = b'{"id":"j"}\n' + b"x" * 200_000

    async def hear() -> dict[str, Any]:
        client = AsyncRedis.from_url(redis_url)
        pubsub = listener(client)
        try:
            await pubsub.subscribe(channel)
            await asyncio.to_thread(redis_client.publish, channel, message)
            while True:
                heard = await pubsub.get_message(timeout=5.0)
                if heard is not None:
                    return heard
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            await client.aclose()

    with caplog.at_level(logging.DEBUG, logger="push_response"):
        heard = run_on_own_thread(hear)
    assert heard["type"] == "message"  # the subscribe confirmation was skipped
    assert heard["data"] == message
    assert not [record for record in caplog.records if record.name == "push_response"]


@pytest.fixture
def line(redis_url: str) -> Iterator[Line]:
    """A Line to the test Redis, closed after the test."""
    held = Line(redis_url)
    yield held
    held.close()


def ask(line: Line, *command: Any) -> list[Any]:
    """The replies of one command sent on ``line``."""
    pipe = line.pipeline()
    pipe.execute_command(*command)
    return line.send(pipe).replies()


def a_hash(redis_client: redis.Redis, namespace: str) -> str:
    """A key holding a hash: INCR on it fails with WRONGTYPE."""
    key = f"{namespace}:a-hash"
    redis_client.hset(key, "field", "value")
    return key


def test_commands_sent_on_a_line_answer_in_order_once_read(line: Line) -> None:
    pipe = line.pipeline()
    for value in ("a", "b", "c"):
        queue_script(pipe, "return ARGV[1]", [], [value])
    sent = line.send(pipe)
    assert sent.replies() == [b"a", b"b", b"c"]
    assert ask(line, "ECHO", "next") == [b"next"]  # nothing left unread before it


def test_an_error_reply_is_raised_once_every_reply_is_read(
    line: Line, redis_client: redis.Redis, namespace: str
) -> None:
    key = a_hash(redis_client, namespace)
    pipe = line.pipeline()
    queue_script(pipe, "return redis.call('INCR', KEYS[1])", [key], [])  # WRONGTYPE
    queue_script(pipe, "return ARGV[1]", [], ["after"])
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        line.send(pipe).replies()
    # The reply after the error was read too: the next command gets its own.
    assert ask(line, "ECHO", "next") == [b"next"]


class RecordedWrites:
    """A connection's socket, passed through, with each ``sendall`` recorded."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.writes: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.sock.sendall(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def test_commands_around_a_long_argument_go_out_in_one_write(line: Line) -> None:
    ask(line, "PING")  # connected
    connection = line._connection
    recorded = connection._sock = RecordedWrites(connection._sock)
    pipe = line.pipeline()
    queue_script(pipe, "return string.len(ARGV[1])", [], ["x" * 20_000])  # a result's size
    pipe.execute_command("ECHO", "after")
    assert line.send(pipe).replies() == [20_000, b"after"]
    assert len(recorded.writes) == 1


def test_abandoned_commands_leave_no_reply_behind(line: Line) -> None:
    pipe = line.pipeline()
    queue_script(pipe, "return ARGV[1]", [], ["stale"])
    line.send(pipe).abandon()
    assert ask(line, "ECHO", "fresh") == [b"fresh"]


def test_a_line_the_server_closed_opens_a_new_connection_before_sending(
    line: Line, redis_client: redis.Redis
) -> None:
    (first,) = ask(line, "CLIENT", "ID")
    assert redis_client.client_kill_filter(_id=first) == 1
    time.sleep(0.1)  # the server's close reaches the socket
    (second,) = ask(line, "CLIENT", "ID")  # no error: the closed connection was replaced
    assert second != first


def test_a_held_connection_answers_in_order_and_goes_on_once_the_server_closed_it(
    redis_url: str, redis_client: redis.Redis, namespace: str
) -> None:
    key = a_hash(redis_client, namespace)

    async def scenario() -> list[list[Any]]:
        client = AsyncRedis.from_url(redis_url)
        held = HeldConnection(client)
        try:
            first = await held.exchange([("ECHO", "a"), ("INCR", key), ("CLIENT", "ID")])
            assert redis_client.client_kill_filter(_id=first[2]) == 1
            await asyncio.sleep(0.1)  # the server's close reaches the socket
            return [first, await held.exchange([("ECHO", "b"), ("CLIENT", "ID")])]
        finally:
            await held.close()
            await client.aclose()

    first, second = run_on_own_thread(scenario)
    assert first[0] == b"a"
    assert isinstance(first[1], redis.ResponseError)  # WRONGTYPE, as a reply of its own
    assert second[0] == b"b"
    assert second[1] != first[2]  # a new connection


@pytest.mark.parametrize("resp", [2, 3])
def test_a_blocking_read_comes_in_the_shape_of_redis_py(
    redis_url: str, redis_client: redis.Redis, namespace: str, resp: int
) -> None:
    stream = f"{namespace}:stream"
    redis_client.xgroup_create(stream, "group", id="0", mkstream=True)
    ids = [redis_client.xadd(stream, {"job": f"j{i}"}) for i in range(2)]

    async def scenario() -> Any:
        client = AsyncRedis.from_url(redis_url, protocol=resp)
        held = HeldConnection(client)
        try:
            read = ("XREADGROUP", "GROUP", "group", "me", "COUNT", 5, "BLOCK", 100)
            (reply,) = await held.exchange([(*read, "STREAMS", stream, ">")])
            return reply
        finally:
            await held.close()
            await client.aclose()

    assert _read_entries(run_on_own_thread(scenario)) == [
        (stream.encode(), [(ids[0], {b"job": b"j0"}), (ids[1], {b"job": b"j1"})])
    ]
    assert _read_entries(None) == []  # nothing came within the wait
