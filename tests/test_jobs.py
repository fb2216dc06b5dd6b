"""Queued jobs: 202 and polling, events, cancellation, webhooks."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.server
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from pydantic import SecretStr
from redis.asyncio import Redis as AsyncRedis

from hearth.settings import Settings
from tests.conftest import MODEL, WEBHOOK_SECRET, Stack
from tests.support import free_port, start_api, wait_for
from workers.protocol import RESULT_APART_BYTES, Job, JobType, Keys
from workers.webhooks import WebhookSender

pytestmark = pytest.mark.integration

QUICK = {"model": "demo-dit", "prompt": "a quick one", "num_inference_steps": 4, "seed": 1}
SLOW = {"model": "demo-unet", "prompt": "a slow one", "size": "512x512", "num_inference_steps": 150}


def submit(client: httpx.Client, kind: str, body: dict[str, Any], **extra: Any) -> dict[str, Any]:
    response = client.post("/v1/jobs", json={"type": kind, "input": body, **extra})
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    return job


def wait_until(
    client: httpx.Client, job_id: str, done: Any, timeout_s: float = 60
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if done(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached the expected state: {job}")


def ended(job: dict[str, Any]) -> bool:
    return job["status"] in {"succeeded", "failed", "cancelled", "expired"}


def test_an_images_job_runs_and_keeps_its_result(client: httpx.Client) -> None:
    job = submit(client, "images.generations", QUICK)
    assert job["status"] == "queued"
    assert job["attempts"] == 0
    done = wait_until(client, job["id"], ended)
    assert done["status"] == "succeeded"
    assert done["attempts"] == 1
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]
    assert done["progress"] == {"step": 4, "total": 4}
    sync = client.post("/v1/images/generations", json=QUICK).json()
    assert done["result"]["data"][0]["b64_json"] == sync["data"][0]["b64_json"]


def test_an_embeddings_job_gives_the_synchronous_body(client: httpx.Client) -> None:
    job = submit(client, "embeddings", {"model": MODEL, "input": ["queued text"]})
    done = wait_until(client, job["id"], ended)
    sync = client.post("/v1/embeddings", json={"model": MODEL, "input": ["queued text"]}).json()
    assert done["result"]["data"] == sync["data"]
    assert done["result"]["usage"] == sync["usage"]


def test_a_result_too_large_for_the_reply_reaches_every_reader_whole(
    client: httpx.Client, stack: Stack, redis_client: redis.Redis
) -> None:
    keys = Keys(stack.namespace)
    body = {"model": MODEL, "input": [f"sentence number {i} of a long list" for i in range(40)]}
    before = set(redis_client.scan_iter(match=keys.result("*"), count=1000))
    sync = client.post("/v1/embeddings", json=body)
    assert sync.status_code == 200, sync.text
    assert len(sync.content) > RESULT_APART_BYTES
    # The synchronous answer's result was kept apart, and read from there.
    (kept,) = set(redis_client.scan_iter(match=keys.result("*"), count=1000)) - before
    assert redis_client.get(kept) == sync.content
    receiver = Receiver([])
    try:
        job = submit(client, "embeddings", body, webhook=receiver.url)
        done = wait_until(client, job["id"], ended)
        receiver.wait(1)
    finally:
        receiver.close()
    assert done["status"] == "succeeded"
    assert done["result"] == sync.json()
    assert orjson.loads(receiver.received[0][1])["result"] == sync.json()
    record = redis_client.hgetall(keys.job(job["id"]))
    assert b"result" not in record  # in its own key, expiring with the record
    record_ttl = redis_client.ttl(keys.job(job["id"]))  # read first: the clock runs on
    assert 0 < redis_client.ttl(keys.result(job["id"])) <= record_ttl
    assert list(redis_client.scan_iter(match=keys.result(job["id"]) + ":*")) == []


def test_prefer_respond_async_on_an_openai_route(client: httpx.Client) -> None:
    response = client.post(
        "/v1/images/generations", json=QUICK, headers={"Prefer": "respond-async"}
    )
    assert response.status_code == 202
    assert response.headers["preference-applied"] == "respond-async"
    assert wait_until(client, response.json()["id"], ended)["status"] == "succeeded"


def test_job_input_is_validated_like_the_route(client: httpx.Client) -> None:
    response = client.post(
        "/v1/jobs", json={"type": "images.generations", "input": {**QUICK, "n": 0}}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "input.n"
    response = client.post("/v1/jobs", json={"type": "videos", "input": {}})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "type"
    response = client.post(
        "/v1/jobs", json={"type": "embeddings", "input": {"model": "x", "input": "y"}}
    )
    assert response.status_code == 404


EMBED = {"model": MODEL, "input": "x"}
IMAGE = {"model": "demo-unet", "prompt": "x", "num_inference_steps": 4}


@pytest.mark.parametrize(
    ("kind", "body", "status", "param"),
    [
        # Found by the route, as the route's own body names them.
        ("embeddings", {**EMBED, "input": ""}, 400, "input.input"),
        ("embeddings", {**EMBED, "input": ["ok", ""]}, 400, "input.input[1]"),
        ("embeddings", {**EMBED, "dimensions": 385}, 400, "input.dimensions"),
        ("embeddings", {**EMBED, "model": "no-such-model"}, 404, "input.model"),
        ("embeddings", {**EMBED, "model": "demo-dit"}, 400, "input.model"),
        ("images.generations", {**IMAGE, "size": "100x64"}, 400, "input.size"),
        ("images.generations", {**IMAGE, "n": 11}, 400, "input.n"),
        (
            "images.generations",
            {**IMAGE, "scheduler": "pndm", "num_inference_steps": 2},
            400,
            "input.num_inference_steps",
        ),
        # Found by the schema.
        ("embeddings", {**EMBED, "dimensions": True}, 400, "input.dimensions"),
        ("images.generations", {**IMAGE, "seed": "7"}, 400, "input.seed"),
        ("images.generations", {**IMAGE, "body": 1}, 400, "input.body"),
    ],
)
def test_job_errors_name_the_field_in_the_jobs_body(
    client: httpx.Client, kind: str, body: dict[str, Any], status: int, param: str
) -> None:
    response = client.post("/v1/jobs", json={"type": kind, "input": body})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    if status == 400 and error["code"] != "wrong_model_kind":
        assert error["code"] == "invalid_value"
        assert error["message"].startswith(f"Invalid '{param}': ")


# JSON's \u escapes can spell a lone UTF-16 surrogate: valid JSON, not valid text.
@pytest.mark.parametrize(
    ("content", "param"),
    [
        (
            b'{"type": "embeddings", "input": {"model": "all-minilm-l6-v2", "input": "a\\ud800b"}}',
            "input.input",
        ),
        (b'{"type": "\\ud800", "input": {}}', "type"),
    ],
)
def test_a_job_with_a_lone_surrogate_is_a_400(
    client: httpx.Client, content: bytes, param: str
) -> None:
    response = client.post(
        "/v1/jobs", content=content, headers={"content-type": "application/json"}, timeout=10
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_method_a_route_does_not_take_is_a_405_saying_which_it_does(
    client: httpx.Client,
) -> None:
    response = client.put("/v1/jobs/job_nothing")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert set(response.headers["allow"].split(", ")) == {"GET", "DELETE"}


def test_unknown_jobs_are_404(client: httpx.Client) -> None:
    for method, path in (("GET", ""), ("DELETE", ""), ("GET", "/events")):
        response = client.request(method, f"/v1/jobs/job_nothing{path}")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "job_not_found"


def events(client: httpx.Client, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    """Read a job's event stream to its end."""
    received: list[tuple[str, dict[str, Any]]] = []
    name = ""
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event:"):
                name = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                received.append((name, orjson.loads(line.removeprefix("data:").strip())))
    return received


def test_events_follow_a_job_to_its_end(client: httpx.Client) -> None:
    body = {**QUICK, "size": "256x256", "num_inference_steps": 30}
    job = submit(client, "images.generations", body)
    received = events(client, job["id"])
    names = [name for name, _ in received]
    assert names[0] in {"queued", "started"}
    assert "progress" in names
    assert names[-1] == "succeeded"
    progress = [data for name, data in received if name == "progress"]
    assert all(item["total"] == 30 for item in progress)
    assert [item["step"] for item in progress] == sorted(item["step"] for item in progress)
    assert progress[-1]["step"] == 30
    final = received[-1][1]
    assert final["id"] == job["id"]
    assert final["result"]["data"][0]["seed"] == 1


def test_a_late_listener_gets_the_current_state_first(client: httpx.Client) -> None:
    job = submit(client, "images.generations", QUICK)
    wait_until(client, job["id"], ended)
    received = events(client, job["id"])
    assert [name for name, _ in received] == ["succeeded"]
    assert received[0][1]["status"] == "succeeded"


@pytest.mark.parametrize("model", ["demo-unet", "demo-dit"])
def test_cancelling_a_running_job_stops_it_and_frees_the_worker(
    client: httpx.Client, model: str
) -> None:
    # demo-unet stops through diffusers' interrupt, demo-dit (an older pipeline
    # API, with no interrupt) by leaving its step callback.
    job = submit(client, "images.generations", {**SLOW, "model": model})
    wait_until(client, job["id"], lambda j: (j["progress"] or {}).get("step", 0) >= 2)
    cancelled_at = time.monotonic()
    response = client.delete(f"/v1/jobs/{job['id']}")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    # The worker stops at its next step and takes the next job.
    after = submit(client, "images.generations", QUICK)
    assert wait_until(client, after["id"], ended, timeout_s=30)["status"] == "succeeded"
    assert time.monotonic() - cancelled_at < 10
    final = client.get(f"/v1/jobs/{job['id']}").json()
    assert final["status"] == "cancelled"
    assert final["progress"]["step"] < 150
    assert final["result"] is None
    again = client.delete(f"/v1/jobs/{job['id']}")
    assert again.status_code == 409
    assert "already ended (cancelled)" in again.json()["error"]["message"]


def test_a_queued_job_cancelled_never_runs(client: httpx.Client) -> None:
    blocker = submit(client, "images.generations", SLOW)
    wait_until(client, blocker["id"], lambda j: j["status"] == "running")
    queued = submit(client, "images.generations", QUICK)
    assert client.delete(f"/v1/jobs/{queued['id']}").status_code == 200
    client.delete(f"/v1/jobs/{blocker['id']}")
    probe = submit(client, "images.generations", QUICK)
    wait_until(client, probe["id"], ended)
    never = client.get(f"/v1/jobs/{queued['id']}").json()
    assert never["status"] == "cancelled"
    assert never["attempts"] == 0
    assert never["started_at"] is None


def test_cancelling_a_finished_job_says_so(client: httpx.Client) -> None:
    job = submit(client, "images.generations", QUICK)
    wait_until(client, job["id"], ended)
    response = client.delete(f"/v1/jobs/{job['id']}")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "job_ended"
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"


class Receiver:
    """A local webhook endpoint that answers with the statuses it is given, then 200;
    ``on_delivery`` runs with each delivery's job id before it is answered."""

    def __init__(
        self, statuses: list[int], on_delivery: Callable[[str], None] | None = None
    ) -> None:
        self.statuses = statuses
        self.received: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((dict(self.headers), body))
                if on_delivery is not None:
                    on_delivery(self.headers["Hearth-Job-Id"])
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait(self, count: int, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.received) >= count, f"got {len(self.received)} deliveries, wanted {count}"

    def statuses_delivered(self) -> list[str]:
        return [orjson.loads(body)["status"] for _, body in self.received]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver([500, 503])  # the first two deliveries fail: retried
    yield server
    server.close()


def test_webhooks_are_signed_and_retried(client: httpx.Client, receiver: Receiver) -> None:
    job = submit(client, "images.generations", QUICK, webhook=receiver.url)
    receiver.wait(3)
    headers, body = receiver.received[-1]
    signature = {
        k: v for k, v in (part.split("=", 1) for part in headers["Hearth-Signature"].split(","))
    }
    expected = hmac.new(
        WEBHOOK_SECRET.encode(), f"{signature['t']}.".encode() + body, hashlib.sha256
    ).hexdigest()
    assert hmac.compare_digest(signature["v1"], expected)
    assert abs(int(signature["t"]) - time.time()) < 60
    delivered = orjson.loads(body)
    assert delivered["id"] == job["id"] == headers["Hearth-Job-Id"]
    assert delivered["status"] == "succeeded"
    assert delivered["result"]["data"][0]["b64_json"]
    time.sleep(1)  # a success is the end: no further delivery
    assert len(receiver.received) == 3
    assert all(retried == body for _, retried in receiver.received)


def test_a_failing_webhook_never_fails_the_job(client: httpx.Client, stack: Stack) -> None:
    dead = f"http://127.0.0.1:{free_port()}/nobody-listens"
    job = submit(client, "images.generations", QUICK, webhook=dead)
    done = wait_until(client, job["id"], ended)
    assert done["status"] == "succeeded"
    assert done["webhook"] == dead


def test_a_webhook_that_outlives_its_job_leaves_no_record_behind(
    client: httpx.Client, stack: Stack, redis_client: redis.Redis
) -> None:
    keys = Keys(stack.namespace)
    # The record expires while the delivery is under way (a result TTL shorter
    # than the retries): the delivery's outcome must not bring it back.
    receiver = Receiver([], on_delivery=lambda job_id: redis_client.delete(keys.job(job_id)))
    try:
        job = submit(client, "embeddings", {"model": MODEL, "input": "gone"}, webhook=receiver.url)
        receiver.wait(1)
        time.sleep(1)  # the sender notes the delivery just after its answer
    finally:
        receiver.close()
    assert not redis_client.exists(keys.job(job["id"]))
    for method in ("GET", "DELETE"):
        response = client.request(method, f"/v1/jobs/{job['id']}")
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "job_not_found"


def test_what_is_left_of_an_expired_record_reads_as_not_found(
    client: httpx.Client, stack: Stack, redis_client: redis.Redis
) -> None:
    # Such a bare hash, with no TTL, was all a late webhook outcome left before.
    job_id = f"job_{uuid.uuid4().hex}"
    redis_client.hset(Keys(stack.namespace).job(job_id), "webhook_status", "failed")
    for method, path in (("GET", ""), ("DELETE", ""), ("GET", "/events")):
        response = client.request(method, f"/v1/jobs/{job_id}{path}")
        assert response.status_code == 404, response.text


def test_a_webhook_of_a_record_gone_is_not_sent(stack: Stack, redis_url: str) -> None:
    receiver = Receiver([])
    settings = Settings(webhook_secret=SecretStr(WEBHOOK_SECRET), webhook_attempts=1)

    async def deliver() -> None:
        client = AsyncRedis.from_url(redis_url)
        sender = WebhookSender(settings, client, Keys(stack.namespace))
        try:
            await sender.deliver(f"job_{uuid.uuid4().hex}", receiver.url)
        finally:
            await sender.drain()
            await client.aclose()

    try:
        # On a thread of its own: the browser tests' driver may hold this one's loop.
        with ThreadPoolExecutor(max_workers=1) as thread:
            thread.submit(asyncio.run, deliver()).result()
        assert receiver.received == []
    finally:
        receiver.close()


@pytest.fixture
def idle_api(
    stack: Stack, namespace: str, tmp_path: Path
) -> Iterator[tuple[httpx.Client, redis.Redis]]:
    """An API whose jobs no worker takes, with a 1 s job deadline and a 5 s result TTL."""
    env = {
        **stack.env,
        "HEARTH_NAMESPACE": namespace,
        "HEARTH_JOB_TIMEOUT_S": "1",
        "HEARTH_RESULT_TTL_S": "5",
    }
    api, url = start_api(env, tmp_path)
    client = redis.Redis.from_url(env["REDIS_URL"])
    try:
        wait_for(f"{url}/healthz", [api])
        with httpx.Client(base_url=url, timeout=30) as http:
            yield http, client
    finally:
        api.stop()
        client.close()


def test_a_queued_job_nobody_takes_ends_expired(
    idle_api: tuple[httpx.Client, redis.Redis], namespace: str
) -> None:
    client, redis_client = idle_api
    receiver = Receiver([])
    try:
        job = submit(client, "embeddings", {"model": MODEL, "input": "late"}, webhook=receiver.url)
        with ThreadPoolExecutor(max_workers=1) as pool:
            following = pool.submit(events, client, job["id"])
            time.sleep(0.5)
            assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"
            time.sleep(1)  # past its deadline
            expired = client.get(f"/v1/jobs/{job['id']}").json()
            received = following.result(timeout=10)
        receiver.wait(1)
        time.sleep(0.5)  # and no second delivery
        assert receiver.statuses_delivered() == ["expired"]
    finally:
        receiver.close()
    assert expired["status"] == "expired"
    assert expired["error"]["type"] == "timeout"
    assert expired["finished_at"] >= expired["created_at"] + 1
    assert expired["started_at"] is None
    # Its followers hear the end; the record lives the result TTL from then on.
    assert [name for name, _ in received] == ["queued", "expired"]
    assert received[-1][1]["status"] == "expired"
    assert 0 < redis_client.pttl(Keys(namespace).job(job["id"])) <= 5000
    again = client.delete(f"/v1/jobs/{job['id']}")
    assert again.status_code == 409
    assert "already ended (expired)" in again.json()["error"]["message"]


def test_a_queued_follower_sees_the_job_expire_at_its_deadline(
    idle_api: tuple[httpx.Client, redis.Redis],
) -> None:
    client, _ = idle_api
    job = submit(client, "embeddings", {"model": MODEL, "input": "nobody reads it"})
    started = time.monotonic()
    received = events(client, job["id"])  # nothing else reads the job meanwhile
    # At its 1 s deadline, not at the next 5 s poll: by then a short TTL may have taken it.
    assert time.monotonic() - started < 3
    assert [name for name, _ in received] == ["queued", "expired"]


def test_a_followed_job_whose_record_goes_ends_its_events_with_an_error(
    idle_api: tuple[httpx.Client, redis.Redis], namespace: str
) -> None:
    client, redis_client = idle_api
    job = submit(client, "embeddings", {"model": MODEL, "input": "gone"})
    with ThreadPoolExecutor(max_workers=1) as pool:
        following = pool.submit(events, client, job["id"])
        time.sleep(0.3)
        redis_client.delete(Keys(namespace).job(job["id"]))
        received = following.result(timeout=10)  # a whole body: no incomplete chunked read
    assert [name for name, _ in received] == ["queued", "error"]
    error = received[-1][1]["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("not_found_error", "job_not_found")


def test_a_queued_job_cancelled_tells_its_webhook(
    idle_api: tuple[httpx.Client, redis.Redis],
) -> None:
    client, _ = idle_api
    receiver = Receiver([])
    try:
        job = submit(client, "embeddings", {"model": MODEL, "input": "no"}, webhook=receiver.url)
        assert client.delete(f"/v1/jobs/{job['id']}").status_code == 200
        receiver.wait(1)
        _, body = receiver.received[0]
        delivered = orjson.loads(body)
        assert delivered["id"] == job["id"]
        assert delivered["status"] == "cancelled"
        assert delivered["attempts"] == 0
        time.sleep(1.5)  # past its deadline too: read again, it stays cancelled, told once
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
        assert receiver.statuses_delivered() == ["cancelled"]
    finally:
        receiver.close()


def test_a_running_job_cancelled_tells_its_webhook_once(client: httpx.Client) -> None:
    receiver = Receiver([])
    try:
        job = submit(client, "images.generations", SLOW, webhook=receiver.url)
        wait_until(client, job["id"], lambda j: (j["progress"] or {}).get("step", 0) >= 1)
        assert client.delete(f"/v1/jobs/{job['id']}").status_code == 200
        # Once the worker took the next job, it has stored what it made of this one.
        probe = submit(client, "images.generations", QUICK)
        assert wait_until(client, probe["id"], ended, timeout_s=30)["status"] == "succeeded"
        receiver.wait(1)
        time.sleep(1)
        assert receiver.statuses_delivered() == ["cancelled"]
    finally:
        receiver.close()


def test_a_worker_meeting_a_job_past_its_deadline_ends_it_unstarted(
    client: httpx.Client, stack: Stack, redis_client: redis.Redis
) -> None:
    # Queued as the API queues it, already past its deadline; nobody reads it,
    # so the worker is the one to meet it.
    receiver = Receiver([])
    keys = Keys(stack.namespace)
    job = Job(
        type=JobType.EMBEDDINGS,
        model=MODEL,
        input={"input": ["too late"], "encoding_format": "float", "dimensions": None},
        deadline=time.time() - 1,
        webhook=receiver.url,
    )
    redis_client.hset(keys.job(job.id), mapping=job.hash_fields())  # type: ignore[arg-type]
    redis_client.expire(keys.job(job.id), 60)
    redis_client.xadd(keys.stream(MODEL), {"job": job.to_json()})
    try:
        receiver.wait(1)
        time.sleep(0.5)
        assert receiver.statuses_delivered() == ["expired"]
    finally:
        receiver.close()
    done = client.get(f"/v1/jobs/{job.id}").json()
    assert done["status"] == "expired"
    assert done["error"]["type"] == "timeout"
    assert done["attempts"] == 0 and done["started_at"] is None  # it never started
    assert 60 < redis_client.ttl(keys.job(job.id)) <= 3600  # the result TTL, from its end


def test_webhooks_need_a_secret(stack: Stack, tmp_path: Path) -> None:
    env = {k: v for k, v in stack.env.items() if k != "HEARTH_WEBHOOK_SECRET"}
    api, url = start_api(env, tmp_path)
    try:
        wait_for(f"{url}/healthz", [api])
        response = httpx.post(
            f"{url}/v1/jobs",
            json={"type": "images.generations", "input": QUICK, "webhook": "http://127.0.0.1:9/x"},
        )
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "webhook"
        assert "HEARTH_WEBHOOK_SECRET" in response.json()["error"]["message"]
    finally:
        api.stop()


def test_a_synchronous_request_past_its_deadline_is_a_504_and_its_job_cancelled(
    stack: Stack, tmp_path: Path, redis_client: redis.Redis
) -> None:
    api, url = start_api({**stack.env, "HEARTH_REQUEST_TIMEOUT_S": "1.5"}, tmp_path)
    try:
        wait_for(f"{url}/readyz", [api])
        before = set(redis_client.scan_iter(match=Keys(stack.namespace).job("*")))
        started = time.monotonic()
        response = httpx.post(f"{url}/v1/images/generations", json={**SLOW, "seed": 77}, timeout=30)
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "deadline_exceeded"
        assert time.monotonic() - started < 5
        (key,) = set(redis_client.scan_iter(match=Keys(stack.namespace).job("*"))) - before
        assert redis_client.hget(key, "status") == b"cancelled"
    finally:
        api.stop()
    # The worker hears the cancellation and is free again within moments.
    with httpx.Client(base_url=stack.url) as http:
        probe = submit(http, "images.generations", QUICK)
        assert wait_until(http, probe["id"], ended, timeout_s=15)["status"] == "succeeded"


def test_sigterm_lets_the_api_answer_the_requests_it_holds(stack: Stack, tmp_path: Path) -> None:
    api, url = start_api(stack.env, tmp_path)
    wait_for(f"{url}/readyz", [api])
    body = {**QUICK, "size": "512x512", "num_inference_steps": 20}
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(httpx.post, f"{url}/v1/images/generations", json=body, timeout=60)
        time.sleep(0.5)  # the request is in, waiting on its job
        api.popen.send_signal(signal.SIGTERM)
        assert pending.result().status_code == 200
    assert api.popen.wait(30) == 0
    api.stop()


def test_a_synchronous_request_past_its_deadline_leaves_the_job_it_joined_running(
    stack: Stack, tmp_path: Path
) -> None:
    api, url = start_api({**stack.env, "HEARTH_REQUEST_TIMEOUT_S": "1.5"}, tmp_path)
    keyed = {"Idempotency-Key": f"shared-{time.time_ns()}"}
    body = {**SLOW, "seed": 78}
    try:
        wait_for(f"{url}/readyz", [api])
        with httpx.Client(base_url=url, timeout=30) as http:
            queued = http.post(
                "/v1/images/generations", json=body, headers={**keyed, "Prefer": "respond-async"}
            )
            assert queued.status_code == 202
            job_id = queued.json()["id"]
            response = http.post("/v1/images/generations", json=body, headers=keyed)
            assert response.status_code == 504
            assert job_id in response.json()["error"]["message"]
            assert http.get(f"/v1/jobs/{job_id}").json()["status"] in {"queued", "running"}
            assert http.delete(f"/v1/jobs/{job_id}").status_code == 200  # frees the worker
    finally:
        api.stop()
