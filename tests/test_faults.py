"""Faults done for real: workers killed, a poison job, SIGTERM, all on a private Redis."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import orjson
import pytest
import redis

from hearth.embedded_redis import EmbeddedRedis
from tests.conftest import WEBHOOK_SECRET
from tests.support import Process, hearth_env, start_api, wait_for
from tests.test_jobs import Receiver, events
from workers.protocol import CONSUMER_GROUP, Job, JobType, Keys

pytestmark = pytest.mark.integration

NAMESPACE = "faults"


@dataclass
class Site:
    """A private Redis and the environment every Hearth process here shares."""

    root: Path
    server: EmbeddedRedis
    env: dict[str, str]
    client: redis.Redis
    processes: list[Process]

    def start(self, *args: str, **env: str) -> Process:
        log = self.root / f"{args[0]}-{uuid.uuid4().hex[:6]}.log"
        process = Process(list(args), {**self.env, **env}, log)
        self.processes.append(process)
        return process

    def api(self) -> tuple[Process, str]:
        process, url = start_api(self.env, self.root)
        self.processes.append(process)
        wait_for(f"{url}/healthz", [process])
        return process, url


@pytest.fixture
def site(demo_store: Path, private_redis: EmbeddedRedis, tmp_path: Path) -> Iterator[Site]:
    server = private_redis
    env = hearth_env(
        REDIS_URL=server.url,
        HEARTH_NAMESPACE=NAMESPACE,
        HEARTH_STATE_DIR=str(tmp_path / "state"),
        HEARTH_MODELS_DIR=str(demo_store),
        HEARTH_MODELS="demo-dit",
        HEARTH_HEARTBEAT_S="0.5",
        HEARTH_WORKER_TTL_S="3",
        HEARTH_RECLAIM_AFTER_S="2",
        HEARTH_MAX_ATTEMPTS="3",
        HEARTH_TORCH_THREADS="1",
        HEARTH_MAX_BATCH_IMAGES="2",
        HEARTH_WEBHOOK_SECRET=WEBHOOK_SECRET,
    )
    client = redis.Redis.from_url(server.url)
    site = Site(tmp_path, server, env, client, [])
    try:
        yield site
    finally:
        for process in site.processes:
            process.stop()
        client.close()


def submit(
    url: str, body: dict[str, Any], kind: str = "images.generations", webhook: str | None = None
) -> str:
    job: dict[str, Any] = {"type": kind, "input": body}
    if webhook is not None:
        job["webhook"] = webhook
    response = httpx.post(f"{url}/v1/jobs", json=job)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def wait_all(url: str, job_ids: list[str], timeout_s: float = 120) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    jobs: dict[str, dict[str, Any]] = {}
    with httpx.Client(base_url=url) as http:
        while time.monotonic() < deadline:
            jobs = {job_id: http.get(f"/v1/jobs/{job_id}").json() for job_id in job_ids}
            if all(job["status"] not in ("queued", "running") for job in jobs.values()):
                return jobs
            time.sleep(0.2)
    pending = {k: v["status"] for k, v in jobs.items() if v["status"] in ("queued", "running")}
    raise AssertionError(f"jobs never ended: {pending}")


def wait_running(url: str, job_ids: list[str]) -> None:
    """Until one of the jobs has started on a worker (not merely been read by one)."""
    deadline = time.monotonic() + 30
    with httpx.Client(base_url=url) as http:
        while not any(
            http.get(f"/v1/jobs/{job_id}").json()["status"] == "running" for job_id in job_ids
        ):
            assert time.monotonic() < deadline, "no job started"
            time.sleep(0.01)


def running_worker(client: redis.Redis, job_ids: list[str]) -> str:
    """The name of a worker running one of the jobs, as that job's record says,
    once one runs. (A worker holding entries may hold them still unstarted, its
    batch filling; killing it would take nothing over mid-run.)"""
    deadline = time.monotonic() + 30
    while True:
        for job_id in job_ids:
            status, worker = client.hmget(Keys(NAMESPACE).job(job_id), "status", "worker")
            if status == b"running" and worker:
                return cast(bytes, worker).decode()
        assert time.monotonic() < deadline, "no job started"
        time.sleep(0.005)


def two_workers(site: Site, **env: str) -> tuple[list[Process], str]:
    """Two workers, both live, and an API: its URL."""
    workers = [site.start("worker", **env) for _ in range(2)]
    _api, url = site.api()
    wait_for(f"{url}/readyz", workers)
    wait_until_both_live = time.monotonic() + 30
    while len(site.client.hkeys(Keys(NAMESPACE).workers())) < 2:
        assert time.monotonic() < wait_until_both_live
        time.sleep(0.1)
    return workers, url


def kill_mid_batch_and_wait(
    site: Site, workers: list[Process], url: str, job_ids: list[str], model: str
) -> dict[str, dict[str, Any]]:
    """Kill -9 the first worker seen running one of the jobs, in the middle of its batch; once
    every job has ended, check each succeeded, one was taken over, and nothing is
    left pending or dead. The jobs as they ended."""
    victim_name = running_worker(site.client, job_ids)
    victim = next(w for w in workers if str(w.pid) in victim_name)
    os.kill(victim.pid, signal.SIGKILL)
    victim.popen.wait(10)

    jobs = wait_all(url, job_ids)
    assert {job["status"] for job in jobs.values()} == {"succeeded"}
    assert any(job["attempts"] == 2 for job in jobs.values()), "no job was taken over"
    stream = Keys(NAMESPACE).stream(model)
    assert site.client.xpending(stream, CONSUMER_GROUP)["pending"] == 0
    assert site.client.xlen(Keys(NAMESPACE).dead_letters()) == 0
    return jobs


def test_a_worker_killed_mid_job_loses_nothing(site: Site) -> None:
    workers, url = two_workers(site)
    body = {"model": "demo-dit", "prompt": "survive", "size": "256x256", "num_inference_steps": 20}
    job_ids = [submit(url, {**body, "seed": seed}) for seed in range(24)]
    jobs = kill_mid_batch_and_wait(site, workers, url, job_ids, "demo-dit")
    assert all(len(job["result"]["data"]) == 1 for job in jobs.values())
    seeds = sorted(job["result"]["data"][0]["seed"] for job in jobs.values())
    assert seeds == list(range(24))


EMBEDDING = "all-minilm-l6-v2"
# A worker without image pipelines runs its model on its event loop's thread
# (Worker._run_on_loop). In passes of at most 64 padded tokens, one job of 300
# sentences takes 75 passes: long enough to be cut off in the middle.
LONG_EMBEDDINGS = {"HEARTH_MAX_BATCH_TOKENS": "64", "HEARTH_MAX_BATCH_JOBS": "2"}


def long_embeddings(job: int) -> dict[str, Any]:
    sentences = [f"Job {job}, sentence {i}: the weather in town today." for i in range(300)]
    return {"model": EMBEDDING, "input": sentences}


def test_an_embedding_worker_killed_mid_batch_loses_nothing(site: Site) -> None:
    site.env["HEARTH_MODELS"] = EMBEDDING
    workers, url = two_workers(site, **LONG_EMBEDDINGS)
    job_ids = [submit(url, long_embeddings(n), kind="embeddings") for n in range(6)]
    jobs = kill_mid_batch_and_wait(site, workers, url, job_ids, EMBEDDING)
    assert all(len(job["result"]["data"]) == 300 for job in jobs.values())


def test_redis_restarted_under_an_embedding_worker_loses_no_job(site: Site) -> None:
    site.env["HEARTH_MODELS"] = EMBEDDING
    worker = site.start("worker", HEARTH_REDIS_TIMEOUT_S="1", **LONG_EMBEDDINGS)
    _api, url = site.api()
    wait_for(f"{url}/readyz", [worker])
    job_ids = [submit(url, long_embeddings(n), kind="embeddings") for n in range(4)]
    wait_running(url, job_ids)

    site.server.stop()  # append-only file on: what was queued is on disk
    time.sleep(1.0)
    site.server.start()

    jobs = wait_all(url, job_ids, timeout_s=120)
    assert {job["status"] for job in jobs.values()} == {"succeeded"}
    assert all(len(job["result"]["data"]) == 300 for job in jobs.values())
    assert worker.popen.poll() is None
    after = submit(url, long_embeddings(99), kind="embeddings")
    assert wait_all(url, [after])[after]["status"] == "succeeded"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver([])
    yield server
    server.close()


def test_a_poison_job_goes_to_the_dead_letters_and_the_rest_succeed(
    site: Site, receiver: Receiver
) -> None:
    worker = site.start("worker")
    _api, url = site.api()
    wait_for(f"{url}/readyz", [worker])
    keys = Keys(NAMESPACE)
    # A producer that skipped validation: 72 is no multiple of the DiT's patch grid,
    # so the pipeline itself raises, on every attempt.
    poison = Job(
        type=JobType.IMAGES_GENERATIONS,
        model="demo-dit",
        input={
            "prompt": "poison",
            "negative_prompt": "",
            "n": 1,
            "width": 72,
            "height": 64,
            "steps": 4,
            "guidance": 4.5,
            "seed": 1,
            "scheduler": "",
            "response_format": "b64_json",
        },
        deadline=time.time() + 120,
        webhook=receiver.url,
    )
    good = {"model": "demo-dit", "prompt": "fine", "num_inference_steps": 4}
    before = [submit(url, {**good, "seed": seed}) for seed in range(3)]
    site.client.hset(keys.job(poison.id), mapping=poison.hash_fields())
    site.client.xadd(keys.stream("demo-dit"), {"job": poison.to_json()})
    after = [submit(url, {**good, "seed": seed}) for seed in range(3, 6)]

    jobs = wait_all(url, [*before, poison.id, *after])
    assert all(jobs[job_id]["status"] == "succeeded" for job_id in before + after)
    failed = jobs[poison.id]
    assert failed["status"] == "failed"
    assert failed["attempts"] == 3
    assert "gave up after 3 attempt(s)" in failed["error"]["message"]
    letters = site.client.xrange(keys.dead_letters())
    assert len(letters) == 1
    assert Job.from_json(letters[0][1][b"job"]).id == poison.id
    assert worker.popen.poll() is None  # the worker lives on
    # Its webhook hears of the end, once: the attempts before it were retried.
    receiver.wait(1)
    time.sleep(1)
    assert [orjson.loads(body)["status"] for _, body in receiver.received] == ["failed"]


def test_a_batch_held_behind_another_models_is_not_taken_over(site: Site) -> None:
    # One read can give a worker a batch of each of its models; it runs them one
    # after the other, and holds the later ones claimed meanwhile.
    site.env["HEARTH_MODELS"] = "demo-dit,all-minilm-l6-v2"  # the image batch first
    _api, url = site.api()
    # Long enough for the second worker to start and look for entries to take over.
    body = {"model": "demo-dit", "prompt": "long", "size": "512x512", "num_inference_steps": 150}
    image = submit(url, {**body, "seed": 1, "n": 2})
    text = submit(url, {"model": "all-minilm-l6-v2", "input": "held"}, kind="embeddings")
    quick_reclaim = {"HEARTH_RECLAIM_AFTER_S": "1.5"}
    holder = site.start("worker", HEARTH_WORKER_NAME="holder", **quick_reclaim)
    wait_running(url, [image])
    # A second worker takes over what stays unacknowledged past HEARTH_RECLAIM_AFTER_S.
    bystander = site.start(
        "worker", HEARTH_MODELS="all-minilm-l6-v2", HEARTH_WORKER_NAME="bystander", **quick_reclaim
    )
    jobs = wait_all(url, [image, text])
    holder.check_alive()
    bystander.check_alive()
    assert {job["status"] for job in jobs.values()} == {"succeeded"}
    assert jobs[text]["attempts"] == 1
    assert site.client.hget(Keys(NAMESPACE).job(text), "worker") == b"holder"


def test_a_stalled_worker_and_the_one_that_took_over_tell_the_webhook_once(
    site: Site, receiver: Receiver
) -> None:
    quick_reclaim = {"HEARTH_RECLAIM_AFTER_S": "1.5"}
    workers = {
        name: site.start("worker", HEARTH_WORKER_NAME=name, **quick_reclaim)
        for name in ("first", "second")
    }
    _api, url = site.api()
    wait_for(f"{url}/readyz", list(workers.values()))
    body = {"model": "demo-dit", "prompt": "stall", "size": "512x512", "num_inference_steps": 60}
    job_id = submit(url, {**body, "seed": 3}, webhook=receiver.url)
    wait_running(url, [job_id])
    key = Keys(NAMESPACE).job(job_id)
    stalled = site.client.hget(key, "worker")
    assert stalled is not None
    other = next(name for name in workers if name != stalled.decode())
    os.kill(workers[stalled.decode()].pid, signal.SIGSTOP)  # mid-run, past its lease
    try:
        deadline = time.monotonic() + 60
        while site.client.hget(key, "worker") != other.encode():
            assert time.monotonic() < deadline, "the job was not taken over"
            time.sleep(0.05)
    finally:
        os.kill(workers[stalled.decode()].pid, signal.SIGCONT)
    # Both runs end; the first to store the job tells the webhook, the other nothing.
    job = wait_all(url, [job_id])[job_id]
    assert job["status"] == "succeeded"
    assert job["attempts"] == 2
    receiver.wait(1)
    stream = Keys(NAMESPACE).stream("demo-dit")
    deadline = time.monotonic() + 90
    while site.client.xpending(stream, CONSUMER_GROUP)["pending"]:  # until both runs are done
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(3)  # the slower run may still be storing
    assert [orjson.loads(body)["status"] for _, body in receiver.received] == ["succeeded"]


def test_sigterm_drains_the_running_batch(site: Site) -> None:
    worker = site.start("worker")
    _api, url = site.api()
    wait_for(f"{url}/readyz", [worker])
    body = {"model": "demo-dit", "prompt": "drain", "size": "512x512", "num_inference_steps": 30}
    job_id = submit(url, {**body, "seed": 1})
    with httpx.Client(base_url=url) as http:
        deadline = time.monotonic() + 30
        while http.get(f"/v1/jobs/{job_id}").json()["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        worker.popen.send_signal(signal.SIGTERM)
        assert worker.popen.wait(60) == 0
        job = http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded"
    assert site.client.xpending(Keys(NAMESPACE).stream("demo-dit"), CONSUMER_GROUP)["pending"] == 0
    assert not site.client.hkeys(Keys(NAMESPACE).workers())


def test_a_restarted_worker_first_finishes_its_own_jobs(site: Site) -> None:
    worker = site.start("worker", HEARTH_WORKER_NAME="stable-worker", HEARTH_RECLAIM_AFTER_S="600")
    _api, url = site.api()
    wait_for(f"{url}/readyz", [worker])
    body = {"model": "demo-dit", "prompt": "again", "size": "512x512", "num_inference_steps": 30}
    job_id = submit(url, {**body, "seed": 2})
    wait_running(url, [job_id])
    os.kill(worker.pid, signal.SIGKILL)
    worker.popen.wait(10)
    # Nobody else would take it for ten minutes; the same name picks it up at once.
    site.start("worker", HEARTH_WORKER_NAME="stable-worker", HEARTH_RECLAIM_AFTER_S="600")
    job = wait_all(url, [job_id], timeout_s=90)[job_id]
    assert job["status"] == "succeeded"
    assert job["attempts"] == 2


def test_concurrent_sync_requests_survive_a_killed_worker(site: Site) -> None:
    workers = [site.start("worker"), site.start("worker")]
    _api, url = site.api()
    wait_for(f"{url}/readyz", workers)

    def one(seed: int) -> int:
        body = {
            "model": "demo-dit",
            "prompt": "sync",
            "seed": seed,
            "num_inference_steps": 10,
            "size": "256x256",
        }
        return httpx.post(f"{url}/v1/images/generations", json=body, timeout=120).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(one, seed) for seed in range(8)]
        time.sleep(1.0)
        os.kill(workers[0].pid, signal.SIGKILL)
        assert [future.result() for future in futures] == [200] * 8


def test_redis_restarted_mid_run_loses_no_job(site: Site) -> None:
    worker = site.start("worker", HEARTH_REDIS_TIMEOUT_S="1")
    _api, url = site.api()
    wait_for(f"{url}/readyz", [worker])
    body = {"model": "demo-dit", "prompt": "outage", "size": "256x256", "num_inference_steps": 20}
    job_ids = [submit(url, {**body, "seed": seed}) for seed in range(8)]
    wait_running(url, job_ids)

    site.server.stop()  # append-only file on: what was queued is on disk
    with httpx.Client(base_url=url, timeout=30) as http:
        started = time.monotonic()
        down = http.post("/v1/jobs", json={"type": "images.generations", "input": body})
        assert down.status_code == 503
        assert down.json()["error"]["code"] == "queue_unavailable"
        assert time.monotonic() - started < 5
        assert http.get("/readyz").status_code == 503
    time.sleep(1.0)
    site.server.start()

    # API and worker reconnect by themselves; the job cut off mid-run is taken over.
    jobs = wait_all(url, job_ids, timeout_s=120)
    assert {job["status"] for job in jobs.values()} == {"succeeded"}
    assert worker.popen.poll() is None
    after = submit(url, {**body, "seed": 99})
    assert wait_all(url, [after])[after]["status"] == "succeeded"


def test_requests_right_after_a_redis_restart_reconnect(site: Site) -> None:
    _api, url = site.api()
    with httpx.Client(base_url=url) as http:
        # Each request holds a pooled connection to Redis for its round trips.
        assert [http.get(f"/v1/jobs/job_{n}").status_code for n in range(4)] == [404] * 4
        site.server.stop()
        site.server.start()
        # The connections left in the pool are dead: a request retries on a new one.
        assert [http.get(f"/v1/jobs/job_{n}").status_code for n in range(4)] == [404] * 4


def test_metrics_are_served_while_redis_is_down(site: Site) -> None:
    _api, url = site.api()
    with httpx.Client(base_url=url) as http:
        up = http.get("/metrics")
        assert up.status_code == 200
        assert "hearth_redis_up 1.0" in up.text
        assert 'hearth_queue_depth{model="demo-dit"}' in up.text
        site.server.stop()
        down = http.get("/metrics")
        assert down.status_code == 200
        assert "hearth_redis_up 0.0" in down.text
        assert 'hearth_http_requests_total{method="GET",route="/metrics",status="200"}' in down.text
        assert "hearth_queue_depth{" not in down.text  # unknown now, so not shown
        site.server.start()
        assert "hearth_redis_up 1.0" in http.get("/metrics").text


def test_a_followed_job_is_heard_to_its_end_across_a_redis_restart(site: Site) -> None:
    worker = site.start("worker", HEARTH_REDIS_TIMEOUT_S="1")
    _api, url = site.api()
    wait_for(f"{url}/readyz", [worker])
    body = {
        "model": "demo-dit",
        "prompt": "followed",
        "size": "512x512",
        "num_inference_steps": 150,
    }
    job_id = submit(url, body)
    with httpx.Client(base_url=url, timeout=60) as http, ThreadPoolExecutor(1) as pool:
        following = pool.submit(events, http, job_id)
        wait_running(url, [job_id])
        site.server.stop()
        time.sleep(1.0)
        site.server.start()
        received = following.result(timeout=120)  # a whole body: no incomplete chunked read
    # The follower subscribed again and reread the job: it hears the end, once.
    names = [name for name, _ in received]
    assert "error" not in names
    assert names[-1] == "succeeded"
    assert names.count("succeeded") == 1
    assert received[-1][1]["id"] == job_id


def test_a_job_past_its_deadline_is_skipped_as_expired(site: Site) -> None:
    site.env["HEARTH_JOB_TIMEOUT_S"] = "1"
    _api, url = site.api()
    body = {"model": "demo-dit", "prompt": "too late", "num_inference_steps": 4}
    job_id = submit(url, body)  # no worker yet: it waits in the queue past its deadline
    time.sleep(1.5)
    site.start("worker")
    job = wait_all(url, [job_id], timeout_s=90)[job_id]
    assert job["status"] == "expired"
    assert job["error"]["type"] == "timeout"
    assert job["result"] is None


def test_a_follower_ends_with_an_error_once_redis_stays_away(site: Site) -> None:
    site.env.update(HEARTH_REDIS_TIMEOUT_S="1", HEARTH_FOLLOW_OUTAGE_S="2")
    _api, url = site.api()
    job_id = submit(url, {"model": "demo-dit", "prompt": "never run"})  # no worker: queued
    with httpx.Client(base_url=url, timeout=60) as http, ThreadPoolExecutor(1) as pool:
        following = pool.submit(events, http, job_id)
        time.sleep(1.0)  # subscribed, and told the job is queued
        site.server.stop()
        # A whole body, well before the default 30 s: the setting's 2 s were waited out.
        received = following.result(timeout=15)
    names = [name for name, _ in received]
    assert names == ["queued", "error"]
    error = received[-1][1]["error"]
    assert error["code"] == "queue_unavailable"
    assert error["type"] == "service_unavailable"
