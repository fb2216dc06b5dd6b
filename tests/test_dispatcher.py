"""The API's dispatcher against a real Redis, with this test playing the worker."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
import pytest
import redis
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.dispatcher import DeadlinePassed, Dispatcher
from app.errors import Conflict, Unavailable
from app.idempotency import Idempotency
from hearth.embedded_redis import EmbeddedRedis
from tests.support import run_on_own_thread
from workers.protocol import (
    RESULT_APART_BYTES,
    Job,
    JobStatus,
    JobType,
    Keys,
    queue_finish,
    reply_head,
)
from workers.protocol import Outcome as JobOutcome

MODEL = "all-minilm-l6-v2"
T = TypeVar("T")


def make_job(channel: str, deadline_s: float = 30.0) -> Job:
    return Job(
        type=JobType.EMBEDDINGS,
        model=MODEL,
        input={"input": ["hello"], "encoding_format": "float", "dimensions": None},
        deadline=time.time() + deadline_s,
        reply_to=channel,
    )


def same_key(key: str, caller: str = "anyone", request: str = "embed hello") -> Idempotency:
    return Idempotency(caller=caller, key=key, request=request)


def with_dispatcher(
    redis_url: str, namespace: str, body: Callable[[Dispatcher, Redis], Awaitable[T]]
) -> T:
    async def go() -> T:
        # Named after the test's namespace: a test can tell its own connections from
        # those of the tests that share the server.
        client = Redis.from_url(redis_url, client_name=namespace)
        dispatcher = Dispatcher(client, Keys(namespace), result_ttl_s=60, max_queue_depth=1000)
        await dispatcher.start()
        try:
            return await body(dispatcher, client)
        finally:
            await dispatcher.stop()
            await client.aclose()

    return asyncio.run(go())


async def taken_jobs(client: Redis, keys: Keys, count: int) -> list[Job]:
    """Wait until ``count`` jobs are in the model's stream; the jobs."""
    deadline = time.monotonic() + 10
    while True:
        entries = await client.xrange(keys.stream(MODEL))
        if len(entries) >= count:
            return [Job.from_json(fields[b"job"]) for _, fields in entries]
        assert time.monotonic() < deadline, f"{len(entries)} of {count} jobs queued"
        await asyncio.sleep(0.01)


async def finish(client: Redis, keys: Keys, job: Job, result: bytes, publish: bool) -> None:
    """End ``job`` as a worker does, publishing its reply or (a lost reply) not."""
    outcome = JobOutcome(JobStatus.SUCCEEDED, result=result)
    sent = job if publish else dataclasses.replace(job, reply_to=None)
    pipe = client.pipeline(transaction=False)
    index = queue_finish(pipe, keys, sent, outcome, 60, time.time(), time.time())
    assert (await pipe.execute())[index] == 1


# A small result travels in the reply; a large one is kept apart and read.
RESULTS = [
    orjson.dumps({"object": "list", "data": [1.5, 2.5]}),
    orjson.dumps({"object": "list", "data": [{"b64_json": "A" * RESULT_APART_BYTES}]}),
]


@pytest.mark.parametrize("result", RESULTS, ids=["small", "large"])
def test_a_reply_is_the_workers_result_bytes(redis_url: str, namespace: str, result: bytes) -> None:
    keys = Keys(namespace)

    async def body(dispatcher: Dispatcher, client: Redis) -> dict[str, Any]:
        waiting = asyncio.create_task(dispatcher.run(make_job(dispatcher.channel)))
        (job,) = await taken_jobs(client, keys, 1)
        await finish(client, keys, job, result, publish=True)
        return await asyncio.wait_for(waiting, 5)

    reply = with_dispatcher(redis_url, namespace, body)
    assert reply["status"] == "succeeded"
    assert reply["result"] == result
    assert reply["result_apart"] is False  # the result is in it


@pytest.mark.parametrize("result", RESULTS, ids=["small", "large"])
def test_a_lost_reply_is_found_in_the_jobs_record(
    redis_url: str, namespace: str, result: bytes
) -> None:
    keys = Keys(namespace)

    async def body(dispatcher: Dispatcher, client: Redis) -> tuple[dict[str, Any], float]:
        waiting = asyncio.create_task(dispatcher.run(make_job(dispatcher.channel)))
        (job,) = await taken_jobs(client, keys, 1)
        await finish(client, keys, job, result, publish=False)
        started = time.monotonic()
        reply = await asyncio.wait_for(waiting, 5)
        return reply, time.monotonic() - started

    reply, waited = with_dispatcher(redis_url, namespace, body)
    assert reply["status"] == "succeeded"
    assert reply["result"] == result
    assert waited < 2.5  # read from the record about a second after the submit


def test_a_result_kept_apart_that_redis_lost_is_a_503(redis_url: str, namespace: str) -> None:
    keys = Keys(namespace)

    async def body(dispatcher: Dispatcher, client: Redis) -> None:
        waiting = asyncio.create_task(dispatcher.run(make_job(dispatcher.channel)))
        (job,) = await taken_jobs(client, keys, 1)
        large = b'"' + b"A" * RESULT_APART_BYTES + b'"'
        await finish(client, keys, job, large, publish=False)
        await client.delete(keys.result(job.id))  # lost before the API read it
        outcome = JobOutcome(JobStatus.SUCCEEDED)
        assert job.reply_to is not None
        await client.publish(job.reply_to, reply_head(job.id, outcome, 1.0, 2.0, True))
        with pytest.raises(Unavailable, match="lost job") as raised:
            await asyncio.wait_for(waiting, 5)
        assert raised.value.code == "job_lost"

    with_dispatcher(redis_url, namespace, body)


def test_a_wait_past_its_deadline_ends_and_cancels_the_job(redis_url: str, namespace: str) -> None:
    keys = Keys(namespace)

    async def body(dispatcher: Dispatcher, client: Redis) -> tuple[float, bytes | None]:
        job = make_job(dispatcher.channel, deadline_s=0.5)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await dispatcher.run(job)
        return time.monotonic() - started, await client.hget(keys.job(job.id), "status")

    waited, status = with_dispatcher(redis_url, namespace, body)
    assert 0.5 <= waited < 1.2  # kept to the sweeper's quarter of a second
    assert status == b"cancelled"


def test_a_burst_of_submits_shares_pipelines_and_each_gets_its_own_reply(
    redis_url: str, namespace: str
) -> None:
    keys = Keys(namespace)
    count = 60

    async def body(dispatcher: Dispatcher, client: Redis) -> tuple[list[dict[str, Any]], int]:
        flushes = 0
        flush = dispatcher._flush_submits

        async def counted() -> None:
            nonlocal flushes
            flushes += 1
            await flush()

        dispatcher._flush_submits = counted  # type: ignore[method-assign]
        jobs = [make_job(dispatcher.channel) for _ in range(count)]
        waiting = asyncio.gather(*(dispatcher.run(job) for job in jobs))
        taken = await taken_jobs(client, keys, count)
        assert {job.id for job in taken} == {job.id for job in jobs}
        for job in taken:
            await finish(client, keys, job, orjson.dumps({"id": job.id}), publish=True)
        replies = await asyncio.wait_for(waiting, 10)
        return [{**reply, "job": job.id} for reply, job in zip(replies, jobs, strict=True)], flushes

    replies, flushes = with_dispatcher(redis_url, namespace, body)
    assert flushes < count / 10
    for reply in replies:
        assert reply["id"] == reply["job"]
        assert orjson.loads(reply["result"]) == {"id": reply["job"]}


def test_submits_go_on_once_redis_closed_their_connection(
    redis_url: str, namespace: str, redis_client: redis.Redis
) -> None:
    keys = Keys(namespace)

    async def body(dispatcher: Dispatcher, client: Redis) -> list[str]:
        first = make_job(dispatcher.channel)
        assert await dispatcher.submit(first) == first.id
        # Every connection of this dispatcher's client: the submits' one among them.
        (submits,) = await dispatcher.submits.exchange([("CLIENT", "ID")])
        own = [c["id"] for c in redis_client.client_list() if c["name"] == namespace]
        assert str(submits) in own
        for client_id in own:
            assert redis_client.client_kill_filter(_id=client_id) == 1
        await asyncio.sleep(0.1)  # the close reaches the dispatcher's sockets
        later = [make_job(dispatcher.channel) for _ in range(3)]
        assert await asyncio.gather(*(dispatcher.submit(job) for job in later)) == [
            job.id for job in later
        ]
        return [job.id for job in await taken_jobs(client, keys, 4)]

    taken = with_dispatcher(redis_url, namespace, body)
    assert len(taken) == len(set(taken)) == 4


@pytest.mark.parametrize("result", RESULTS, ids=["small", "large"])
def test_requests_sharing_an_idempotency_key_all_get_the_reply(
    redis_url: str, namespace: str, result: bytes
) -> None:
    keys = Keys(namespace)

    async def body(dispatcher: Dispatcher, client: Redis) -> list[dict[str, Any]]:
        first = asyncio.create_task(dispatcher.run(make_job(dispatcher.channel), same_key("k1")))
        (job,) = await taken_jobs(client, keys, 1)
        second = asyncio.create_task(dispatcher.run(make_job(dispatcher.channel), same_key("k1")))
        await asyncio.sleep(0.2)  # the second request now waits on the first one's job
        await finish(client, keys, job, result, publish=True)
        started = time.monotonic()
        replies = await asyncio.wait_for(asyncio.gather(first, second), 5)
        # Both through the reply itself, not the record read after a second.
        assert time.monotonic() - started < 0.5
        return list(replies)

    replies = with_dispatcher(redis_url, namespace, body)
    assert [reply["id"] for reply in replies] == [replies[0]["id"]] * 2
    assert all(reply["result"] == result for reply in replies)


def test_an_idempotency_key_belongs_to_its_caller_and_its_request(
    redis_url: str, namespace: str
) -> None:
    keys = Keys(namespace)

    async def body(dispatcher: Dispatcher, client: Redis) -> None:
        alice = await dispatcher.submit(make_job(""), same_key("order-42", "alice"))
        bob = make_job("")
        # Another caller's key of the same name is another key: Bob gets his own job.
        assert await dispatcher.submit(bob, same_key("order-42", "bob", "other")) == bob.id
        assert await dispatcher.submit(make_job(""), same_key("order-42", "alice")) == alice
        reused = make_job("")
        with pytest.raises(Conflict) as refused:
            await dispatcher.submit(reused, same_key("order-42", "alice", "other"))
        assert refused.value.code == "idempotency_key_reused"
        assert refused.value.param == "Idempotency-Key"
        assert not await client.exists(keys.job(reused.id))  # nothing left of the refused one
        assert len(await client.xrange(keys.stream(MODEL))) == 2

    with_dispatcher(redis_url, namespace, body)


def test_concurrent_submits_with_one_key_all_find_the_one_job(
    redis_url: str, namespace: str
) -> None:
    keys = Keys(namespace)

    async def body(dispatcher: Dispatcher, client: Redis) -> None:
        async def submit_and_look() -> tuple[str, dict[str, Any] | None]:
            job_id = await dispatcher.submit(make_job(""), same_key("race"))
            return job_id, await dispatcher.view(job_id)

        for _ in range(5):
            await client.delete(keys.idempotency("anyone", "race"))
            found = await asyncio.gather(*(submit_and_look() for _ in range(8)))
            assert len({job_id for job_id, _ in found}) == 1
            # Each one sees the job's record at once, even those that lost the race.
            assert all(view is not None for _, view in found)
        assert len(await client.xrange(keys.stream(MODEL))) == 5

    with_dispatcher(redis_url, namespace, body)


def test_a_wait_that_joined_an_earlier_job_leaves_it_running(
    redis_url: str, namespace: str
) -> None:
    keys = Keys(namespace)

    async def body(dispatcher: Dispatcher, client: Redis) -> None:
        earlier = await dispatcher.submit(make_job(""), same_key("k"))
        with pytest.raises(DeadlinePassed) as passed:
            await dispatcher.run(make_job(dispatcher.channel, deadline_s=0.5), same_key("k"))
        assert passed.value.job_id == earlier
        assert not passed.value.cancelled
        assert await client.hget(keys.job(earlier), "status") == b"queued"

    with_dispatcher(redis_url, namespace, body)


def test_a_key_whose_job_expired_is_refused_at_once(redis_url: str, namespace: str) -> None:
    keys = Keys(namespace)

    async def body(dispatcher: Dispatcher, client: Redis) -> float:
        earlier = await dispatcher.submit(make_job(""), same_key("k"))
        await client.delete(keys.job(earlier))  # its record expired; the key lasts longer
        started = time.monotonic()
        with pytest.raises(Conflict) as refused:
            await dispatcher.run(make_job(dispatcher.channel, deadline_s=5), same_key("k"))
        assert refused.value.code == "idempotency_key_expired"
        return time.monotonic() - started

    assert with_dispatcher(redis_url, namespace, body) < 0.5


def test_a_wait_on_a_job_redis_lost_ends_with_a_503(redis_url: str, namespace: str) -> None:
    keys = Keys(namespace)

    async def body(dispatcher: Dispatcher, client: Redis) -> float:
        waiting = asyncio.create_task(dispatcher.run(make_job(dispatcher.channel, 30)))
        (job,) = await taken_jobs(client, keys, 1)
        await client.delete(keys.job(job.id))  # as a Redis restarted without persistence
        started = time.monotonic()
        with pytest.raises(Unavailable) as lost:
            await asyncio.wait_for(waiting, 5)
        assert lost.value.code == "job_lost"
        return time.monotonic() - started

    assert with_dispatcher(redis_url, namespace, body) < 2  # the record read, not the deadline


def test_a_job_that_cannot_be_encoded_fails_alone(redis_url: str, namespace: str) -> None:
    # Submitted in the same moment, the jobs share one pipeline: the one holding
    # a lone surrogate (no UTF-8 for it) fails, the others are sent and answered.
    keys = Keys(namespace)

    async def body(dispatcher: Dispatcher, client: Redis) -> list[dict[str, Any] | BaseException]:
        unencodable = {"input": ["a\ud800b"], "encoding_format": "float", "dimensions": None}
        bad = dataclasses.replace(make_job(dispatcher.channel), input=unencodable)
        good = [make_job(dispatcher.channel) for _ in range(6)]
        jobs = [good[0], bad, *good[1:]]
        waiting = asyncio.gather(*(dispatcher.run(job) for job in jobs), return_exceptions=True)
        taken = await taken_jobs(client, keys, len(good))
        assert {job.id for job in taken} == {job.id for job in good}
        for job in taken:
            await finish(client, keys, job, orjson.dumps({"id": job.id}), publish=True)
        outcomes = await asyncio.wait_for(waiting, 5)
        assert await client.exists(keys.job(bad.id)) == 0  # nothing of it was written
        return list(outcomes)

    outcomes = with_dispatcher(redis_url, namespace, body)
    assert isinstance(outcomes[1], TypeError)
    for outcome in outcomes[:1] + outcomes[2:]:
        assert isinstance(outcome, dict), outcome
        assert outcome["status"] == "succeeded"


def test_a_record_lives_its_whole_deadline_and_then_the_result_ttl(
    redis_url: str, namespace: str
) -> None:
    keys = Keys(namespace)

    async def body(dispatcher: Dispatcher, client: Redis) -> int:
        job = make_job(dispatcher.channel, deadline_s=30)
        await dispatcher.submit(job)
        return int(await client.pttl(keys.job(job.id)))

    # 30 s to its deadline and 60 s of result TTL; not a second short of that.
    assert 89_000 < with_dispatcher(redis_url, namespace, body) <= 90_000


def test_reading_a_queued_job_past_its_deadline_ends_it_expired(
    redis_url: str, namespace: str
) -> None:
    keys = Keys(namespace)

    async def body(dispatcher: Dispatcher, client: Redis) -> tuple[Any, ...]:
        job = make_job(dispatcher.channel, deadline_s=0.3)
        await dispatcher.submit(job)
        before = await dispatcher.view(job.id)
        await asyncio.sleep(0.5)
        after = await dispatcher.view(job.id)
        return before, after, await client.ttl(keys.job(job.id))

    before, after, ttl = with_dispatcher(redis_url, namespace, body)
    assert before["status"] == "queued"
    assert after["status"] == "expired"
    assert after["error"]["type"] == "timeout"
    assert after["finished_at"] >= after["created_at"] + 0.3
    assert after["started_at"] is None and after["attempts"] == 0
    assert 0 < ttl <= 60  # the result TTL, counted from its end


def test_a_submit_to_a_redis_that_stopped_answering_fails_within_its_timeout(
    private_redis: EmbeddedRedis,
) -> None:
    # Submits go through connections that time a pipeline as a whole, not reply by
    # reply; a Redis that takes the request and never answers still fails it in time.
    server = private_redis
    assert server.process is not None

    async def go() -> tuple[type[BaseException], float, str]:
        client = Redis.from_url(server.url)
        submits = Redis.from_url(server.url, socket_timeout=None)
        dispatcher = Dispatcher(
            client, Keys("hung"), 60, 1000, submits=submits, submit_timeout_s=0.5
        )
        try:
            assert await dispatcher.submit(make_job("nobody"))  # answering: fine
            os.kill(server.process.pid, signal.SIGSTOP)
            started = time.monotonic()
            try:
                # Bounded here too: a submit with no timeout of its own would hang.
                await asyncio.wait_for(dispatcher.submit(make_job("nobody")), 10)
            except Exception as exc:
                return type(exc), time.monotonic() - started, str(exc)
            raise AssertionError("a submit to a stopped Redis succeeded")
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
            await submits.aclose()
            await client.aclose()

    kind, waited, message = run_on_own_thread(go)
    assert issubclass(kind, RedisTimeoutError)
    assert "within 0.5 s" in message
    assert 0.4 < waited < 3
