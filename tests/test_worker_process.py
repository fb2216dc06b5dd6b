"""A `hearth worker` process on its own, fed through the API's dispatcher (no HTTP)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import redis
from redis.asyncio import Redis

from app.dispatcher import Dispatcher
from hearth.threads import openmp_environment
from models.device import choose_placement
from models.embedding import EmbeddingModel
from models.registry import NOOP_ID, PACKAGED_EMBEDDING_ID, ModelKind, Registry
from tests.support import Process, hearth_env
from workers.protocol import CONSUMER_GROUP, Job, JobType, Keys

pytestmark = pytest.mark.integration


def start_worker(redis_url: str, namespace: str, folder: Path, models: str, **env: str) -> Process:
    worker = Process(
        ["worker", "--models", models],
        hearth_env(
            REDIS_URL=redis_url,
            HEARTH_NAMESPACE=namespace,
            HEARTH_STATE_DIR=str(folder),
            **env,
        ),
        folder / "worker.log",
    )
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 120
    try:
        while not client.hlen(Keys(namespace).workers()):
            worker.check_alive()
            assert time.monotonic() < deadline, "the worker never sent a heartbeat"
            time.sleep(0.1)
    finally:
        client.close()
    return worker


def run_jobs(
    redis_url: str, namespace: str, jobs: list[tuple[JobType, str, dict[str, Any]]]
) -> list[dict[str, Any]]:
    """Submit each job as the API does and wait for its reply."""

    async def go() -> list[dict[str, Any]]:
        client = Redis.from_url(redis_url)
        dispatcher = Dispatcher(client, Keys(namespace), result_ttl_s=60, max_queue_depth=100)
        await dispatcher.start()
        try:
            return await asyncio.gather(
                *(
                    dispatcher.run(
                        Job(
                            type=kind,
                            model=model,
                            input=body,
                            deadline=time.time() + 60,
                            reply_to=dispatcher.channel,
                        )
                    )
                    for kind, model, body in jobs
                )
            )
        finally:
            await dispatcher.stop()
            await client.aclose()

    # In a thread of its own: the browser tests keep an event loop running in this one.
    with ThreadPoolExecutor(max_workers=1) as thread:
        return thread.submit(asyncio.run, go()).result()


def test_noop_is_served_only_when_named(tmp_path: Path) -> None:
    registry = Registry.scan(tmp_path)
    assert NOOP_ID not in {spec.id for spec in registry.select([])}
    assert registry.select([NOOP_ID])[0].kind is ModelKind.NOOP


def test_the_noop_model_answers_every_job_at_once(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    worker = start_worker(redis_url, namespace, tmp_path, NOOP_ID)
    try:
        replies = run_jobs(redis_url, namespace, [(JobType.NOOP, NOOP_ID, {})] * 50)
    finally:
        assert worker.stop() == 0
    assert [reply["status"] for reply in replies] == ["succeeded"] * 50
    assert all(orjson.loads(reply["result"]) == {"object": "noop"} for reply in replies)
    assert len({reply["id"] for reply in replies}) == 50
    assert all(reply["started_at"] <= reply["finished_at"] for reply in replies)


def embedding_job(texts: list[Any], dispatcher: Dispatcher) -> Job:
    return Job(
        type=JobType.EMBEDDINGS,
        model=PACKAGED_EMBEDDING_ID,
        input={"input": texts, "encoding_format": "float", "dimensions": None},
        deadline=time.time() + 60,
        reply_to=dispatcher.channel,
    )


@contextlib.asynccontextmanager
async def worker_after_a_batch_of_three(
    redis_url: str, namespace: str, folder: Path, **env: str
) -> AsyncIterator[Dispatcher]:
    """A dispatcher, and a worker started on three queued jobs, once it has answered
    them: under load, its next batch waits for three. Both stop on leaving."""
    client = Redis.from_url(redis_url)
    dispatcher = Dispatcher(client, Keys(namespace), result_ttl_s=60, max_queue_depth=100)
    await dispatcher.start()
    worker = None
    try:
        texts = ([f"{i}"] for i in range(3))
        first = asyncio.gather(*(dispatcher.run(embedding_job(t, dispatcher)) for t in texts))
        while await client.xlen(dispatcher.keys.stream(PACKAGED_EMBEDDING_ID)) < 3:
            await asyncio.sleep(0.01)
        worker = await asyncio.to_thread(
            start_worker, redis_url, namespace, folder, PACKAGED_EMBEDDING_ID, **env
        )
        await first
        yield dispatcher
    finally:
        if worker is not None:
            await asyncio.to_thread(worker.stop)
        await dispatcher.stop()
        await client.aclose()


def test_an_embedding_batch_under_load_waits_for_the_clients_just_answered(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    keys = Keys(namespace)
    wait_s = 1.0

    def job(text: str, dispatcher: Dispatcher) -> Job:
        return embedding_job([text], dispatcher)

    async def go() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], float]:
        async with worker_after_a_batch_of_three(
            redis_url, namespace, tmp_path, HEARTH_EMBEDDING_BATCH_WAIT_MS=str(wait_s * 1000)
        ) as dispatcher:
            # Under load, a batch waits for as many jobs as the last one held (3), and
            # starts once they are in, without waiting out the rest of its wait.
            early = asyncio.create_task(dispatcher.run(job("early", dispatcher)))
            await asyncio.sleep(wait_s / 4)
            late_jobs = [job("late", dispatcher), job("late", dispatcher)]
            full = await asyncio.gather(*(dispatcher.run(each) for each in late_jobs))
            await early
            # Fewer than that: the batch waits until a whole wait brings no new job.
            second = asyncio.create_task(dispatcher.run(job("second", dispatcher)))
            await asyncio.sleep(wait_s / 4)
            third_job = job("third", dispatcher)
            third = await dispatcher.run(third_job)
            await second
            # That batch held two jobs, so the next waits once, for nothing; the one
            # after it follows a batch of one, a lone client's, and starts at once.
            await dispatcher.run(job("after", dispatcher))
            lone_job = job("lone", dispatcher)
            lone = await dispatcher.run(lone_job)
            return (
                early.result(),
                full,
                [late.created_at for late in late_jobs],
                second.result(),
                third,
                third_job.created_at,
                lone,
                lone_job.created_at,
            )

    with ThreadPoolExecutor(max_workers=1) as thread:
        early, full, full_created, second, third, third_created, lone, lone_created = thread.submit(
            asyncio.run, go()
        ).result()
    sizes = redis.Redis.from_url(redis_url).hgetall(keys.batch_sizes(PACKAGED_EMBEDDING_ID))
    assert {int(size): int(count) for size, count in sizes.items()} == {3: 2, 2: 1, 1: 2}
    assert {reply["started_at"] for reply in full} == {early["started_at"]}  # one batch
    assert early["started_at"] - max(full_created) < wait_s / 2  # full: it started at once
    assert second["started_at"] == third["started_at"]  # one batch, which waited for more
    assert third["started_at"] - third_created >= wait_s * 0.9
    assert lone["started_at"] - lone_created < wait_s / 2


def test_a_gathering_batch_with_a_job_the_tokenizer_refuses_answers_the_others(
    redis_url: str, namespace: str, tmp_path: Path, packaged_model_path: Path
) -> None:
    # A producer that skipped validation: a number where a text belongs. The batch
    # tokenizes its jobs as they come while it gathers; that fails on this one.
    wait_s = 1.0

    async def go() -> list[dict[str, Any]]:
        async with worker_after_a_batch_of_three(
            redis_url,
            namespace,
            tmp_path,
            HEARTH_EMBEDDING_BATCH_WAIT_MS=str(wait_s * 1000),
            HEARTH_MAX_ATTEMPTS="1",
        ) as dispatcher:
            gathering = asyncio.create_task(
                dispatcher.run(embedding_job(["the first"], dispatcher))
            )
            await asyncio.sleep(wait_s / 4)
            later = [embedding_job([123], dispatcher), embedding_job(["the last"], dispatcher)]
            rest = await asyncio.gather(*(dispatcher.run(each) for each in later))
            return [await gathering, *rest]

    with ThreadPoolExecutor(max_workers=1) as thread:
        first, refused, last = thread.submit(asyncio.run, go()).result()
    assert first["started_at"] == refused["started_at"] == last["started_at"]  # one batch
    assert refused["status"] == "failed"
    assert "inference failed" in refused["error"]["message"]
    model = EmbeddingModel(packaged_model_path, choose_placement("cpu"))
    expected = model.embed(["the first", "the last"]).vectors
    for reply, vector in zip((first, last), expected, strict=True):
        assert reply["status"] == "succeeded"
        got = np.array(orjson.loads(reply["result"])["data"][0]["embedding"], dtype=np.float32)
        assert float(got @ vector) / float(np.linalg.norm(got) * np.linalg.norm(vector)) > 0.9999


def _long_batch(texts: int) -> dict[str, Any]:
    """An embeddings job input of ``texts`` short sentences, all different."""
    sentences = [f"Sentence {i} of a long batch, about the weather in town." for i in range(texts)]
    return {"input": sentences, "encoding_format": "float", "dimensions": None}


# With passes of at most 64 padded tokens, 300 of these sentences make 75
# passes: the batch lasts many heartbeats on any CPU.
LONG_BATCH_ENV = {"HEARTH_MAX_BATCH_TOKENS": "64", "HEARTH_TORCH_THREADS": "1"}


def test_an_embedding_worker_beats_through_a_long_batch_and_embeds_it_right(
    redis_url: str,
    redis_client: redis.Redis,
    namespace: str,
    tmp_path: Path,
    packaged_model_path: Path,
) -> None:
    # A worker without image pipelines runs its model on its event loop's thread,
    # pausing after each pass: its heartbeat must go on while the batch runs.
    heartbeat_s = 0.05
    keys = Keys(namespace)
    body = _long_batch(300)
    worker = start_worker(
        redis_url,
        namespace,
        tmp_path,
        PACKAGED_EMBEDDING_ID,
        HEARTH_HEARTBEAT_S=str(heartbeat_s),
        HEARTH_WORKER_TTL_S="1",
        **LONG_BATCH_ENV,
    )

    async def go() -> tuple[dict[str, Any], list[float]]:
        client = Redis.from_url(redis_url)
        dispatcher = Dispatcher(client, keys, result_ttl_s=60, max_queue_depth=100)
        await dispatcher.start()
        beats: set[float] = set()
        try:
            job = Job(
                type=JobType.EMBEDDINGS,
                model=PACKAGED_EMBEDDING_ID,
                input=body,
                deadline=time.time() + 120,
                reply_to=dispatcher.channel,
            )
            reply = asyncio.create_task(dispatcher.run(job))
            while not reply.done():
                for beat in await client.hvals(keys.workers()):
                    beats.add(orjson.loads(beat)["heartbeat_at"])
                await asyncio.sleep(heartbeat_s / 5)
            return reply.result(), sorted(beats)
        finally:
            await dispatcher.stop()
            await client.aclose()

    try:
        with ThreadPoolExecutor(max_workers=1) as thread:
            reply, beats = thread.submit(asyncio.run, go()).result()
        sizes = redis_client.hvals(keys.batch_sizes(PACKAGED_EMBEDDING_ID))
    finally:
        assert worker.stop() == 0
    assert reply["status"] == "succeeded"
    started, finished = reply["started_at"], reply["finished_at"]
    passes = sum(int(count) for count in sizes)
    assert passes >= 50, passes
    pass_s = (finished - started) / passes
    # A beat is sent and its answer read between passes, one step of it after each
    # pass: on a machine whose passes outlast the heartbeat, beats come some passes
    # apart. A loop held by the batch would leave one gap of all of its passes.
    allowed = max(5 * heartbeat_s, heartbeat_s + 8 * pass_s)
    assert finished - started > 2 * allowed, "the batch is too short to tell"
    during = [started, *(beat for beat in beats if started < beat < finished), finished]
    longest_gap = max(later - earlier for earlier, later in itertools.pairwise(during))
    assert longest_gap < allowed, (longest_gap, pass_s, finished - started)
    got = np.array([row["embedding"] for row in orjson.loads(reply["result"])["data"]])
    expected = EmbeddingModel(packaged_model_path, choose_placement("cpu")).embed(body["input"])
    np.testing.assert_allclose(got, expected.vectors, atol=1e-5)


def test_sigterm_lets_an_embedding_worker_finish_the_batch_it_runs(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    keys = Keys(namespace)
    worker = start_worker(redis_url, namespace, tmp_path, PACKAGED_EMBEDDING_ID, **LONG_BATCH_ENV)

    async def go() -> dict[str, Any]:
        client = Redis.from_url(redis_url)
        dispatcher = Dispatcher(client, keys, result_ttl_s=60, max_queue_depth=100)
        await dispatcher.start()
        try:
            job = Job(
                type=JobType.EMBEDDINGS,
                model=PACKAGED_EMBEDDING_ID,
                input=_long_batch(300),
                deadline=time.time() + 120,
                reply_to=dispatcher.channel,
            )
            reply = asyncio.create_task(dispatcher.run(job))
            deadline = time.monotonic() + 30
            while await client.hget(keys.job(job.id), "status") != b"running":
                assert time.monotonic() < deadline, "the job never started"
                await asyncio.sleep(0.01)
            worker.popen.send_signal(signal.SIGTERM)
            return await reply
        finally:
            await dispatcher.stop()
            await client.aclose()

    try:
        with ThreadPoolExecutor(max_workers=1) as thread:
            reply = thread.submit(asyncio.run, go()).result()
        assert worker.popen.wait(60) == 0
    finally:
        worker.stop()
    assert reply["status"] == "succeeded"
    assert len(orjson.loads(reply["result"])["data"]) == 300
    check = redis.Redis.from_url(redis_url)
    try:
        pending = check.xpending(keys.stream(PACKAGED_EMBEDDING_ID), CONSUMER_GROUP)
        assert pending["pending"] == 0
        assert not check.hkeys(keys.workers())
    finally:
        check.close()


def _thread_cpus(pid: int) -> list[set[int]]:
    """The CPUs each thread of process ``pid`` may run on."""
    cpus: list[set[int]] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        allowed = next(line for line in status.splitlines() if line.startswith("Cpus_allowed_list"))
        ranges = allowed.split(":", 1)[1].strip()
        members: set[int] = set()
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            members.update(range(int(low), int(high or low) + 1))
        cpus.append(members)
    return cpus


@pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2 or not Path("/proc/self/task").is_dir(),
    reason="needs Linux and at least two CPUs to tell bound threads from free ones",
)
@pytest.mark.parametrize("pinned", [True, False])
def test_pin_threads_binds_the_inference_threads_to_cores(
    redis_url: str, namespace: str, tmp_path: Path, pinned: bool
) -> None:
    worker = start_worker(
        redis_url,
        namespace,
        tmp_path,
        PACKAGED_EMBEDDING_ID,
        HEARTH_PIN_THREADS="1" if pinned else "0",
        HEARTH_TORCH_THREADS="2",
    )
    try:
        body = {"input": ["threads at work"], "encoding_format": "float", "dimensions": None}
        (reply,) = run_jobs(
            redis_url, namespace, [(JobType.EMBEDDINGS, PACKAGED_EMBEDDING_ID, body)]
        )
        assert reply["status"] == "succeeded"
        everywhere = os.sched_getaffinity(0)
        bound = [cpus for cpus in _thread_cpus(worker.pid) if cpus != everywhere]
    finally:
        assert worker.stop() == 0
    if pinned:
        assert bound and all(len(cpus) == 1 for cpus in bound), bound
    else:
        assert bound == []


def test_the_openmp_environment_leaves_explicit_variables_alone() -> None:
    assert openmp_environment(pin=False, environ={}) == {"GOMP_SPINCOUNT": "10000"}
    assert openmp_environment(pin=False, short_spin=False, environ={}) == {}
    assert openmp_environment(pin=True, environ={}) == {
        "GOMP_SPINCOUNT": "10000",
        "OMP_PROC_BIND": "true",
    }
    given = {"GOMP_SPINCOUNT": "0", "OMP_PROC_BIND": "false"}
    assert openmp_environment(pin=True, environ=given) == {}


def test_a_worker_stopped_right_after_it_starts_exits_cleanly(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    # SIGTERM as soon as the first heartbeat lands, while the worker's background
    # tasks are still connecting: every time, it must finish its shutdown.
    client = redis.Redis.from_url(redis_url)
    try:
        for attempt in range(5):
            worker = start_worker(
                redis_url, f"{namespace}-{attempt}", tmp_path, PACKAGED_EMBEDDING_ID
            )
            worker.popen.terminate()
            try:
                code = worker.popen.wait(15)
            except subprocess.TimeoutExpired:
                worker.stop()
                raise AssertionError(f"attempt {attempt}: the worker never exited") from None
            worker.stop()
            assert code == 0, (attempt, worker.output()[-2000:])
            assert not client.hlen(Keys(f"{namespace}-{attempt}").workers())
    finally:
        for key in client.scan_iter(match=f"{namespace}-*"):
            client.delete(key)
        client.close()
