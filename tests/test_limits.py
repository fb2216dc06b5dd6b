"""Limits an API keeps: queue depth, body size, idempotent submissions, content types."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import MODEL, Stack
from tests.support import hearth_env, start_api, wait_for
from workers.protocol import Keys

pytestmark = pytest.mark.integration

ASYNC = {"Prefer": "respond-async"}


@pytest.fixture
def small_api(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[str]:
    """An API with tiny limits and no worker, so queued jobs stay queued."""
    env = hearth_env(
        REDIS_URL=redis_url,
        HEARTH_NAMESPACE=namespace,
        HEARTH_STATE_DIR=str(tmp_path),
        HEARTH_MAX_QUEUE_DEPTH="5",
        HEARTH_MAX_BODY_BYTES="2048",
    )
    api, url = start_api(env, tmp_path)
    try:
        wait_for(f"{url}/healthz", [api])
        yield url
    finally:
        api.stop()


def test_a_flood_past_the_queue_bound_gets_only_202_and_429(
    small_api: str, redis_client: redis.Redis, namespace: str
) -> None:
    def submit(i: int) -> httpx.Response:
        body = {"type": "embeddings", "input": {"model": MODEL, "input": f"flood {i}"}}
        return httpx.post(f"{small_api}/v1/jobs", json=body, timeout=30)

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(submit, range(40)))
    statuses = [response.status_code for response in responses]
    assert set(statuses) == {202, 429}
    assert statuses.count(202) == 5
    refused = next(response for response in responses if response.status_code == 429)
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"
    assert redis_client.xlen(Keys(namespace).stream(MODEL)) == 5
    # Refused jobs leave no record behind.
    assert len(list(redis_client.scan_iter(match=Keys(namespace).job("*")))) == 5


def test_a_declared_body_over_the_limit_is_refused_unread(small_api: str) -> None:
    body = {"model": MODEL, "input": "x" * 4096}
    response = httpx.post(f"{small_api}/v1/embeddings", json=body)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"


def test_a_streamed_body_over_the_limit_is_cut_off(small_api: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "all-minilm-l6-v2", "input": "'
        for _ in range(64):
            yield b"x" * 256
        yield b'"}'

    response = httpx.post(
        f"{small_api}/v1/embeddings", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_a_body_that_is_not_json_is_a_400(client: httpx.Client) -> None:
    response = client.post(
        "/v1/embeddings", content=b"model=x&input=y", headers={"content-type": "text/plain"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_the_same_idempotency_key_returns_the_same_job(client: httpx.Client) -> None:
    body = {
        "type": "images.generations",
        "input": {"model": "demo-dit", "prompt": "once", "seed": 3},
    }
    headers = {"Idempotency-Key": "order-7781"}
    first = client.post("/v1/jobs", json=body, headers=headers)
    second = client.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    other = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-7782"})
    assert other.json()["id"] != first.json()["id"]
    bad = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "has space"})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "Idempotency-Key"


def test_a_repeated_synchronous_request_runs_once(
    stack: Stack, client: httpx.Client, redis_client: redis.Redis
) -> None:
    keys = Keys(stack.namespace)
    before = set(redis_client.scan_iter(match=keys.job("*")))
    headers = {"Idempotency-Key": "embed-once-1"}
    body = {"model": MODEL, "input": "say it once"}
    first = client.post("/v1/embeddings", json=body, headers=headers)
    second = client.post("/v1/embeddings", json=body, headers=headers)
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert len(set(redis_client.scan_iter(match=keys.job("*"))) - before) == 1


def test_an_idempotency_key_holds_to_the_request_it_came_with(client: httpx.Client) -> None:
    embed = {"model": MODEL, "input": "keyed text"}
    keyed = {"Idempotency-Key": f"order-{uuid.uuid4().hex}"}
    job = client.post("/v1/jobs", json={"type": "embeddings", "input": embed}, headers=keyed)
    assert job.status_code == 202
    # The same request through the route, asking to come back for it: the same job.
    queued = client.post("/v1/embeddings", json=embed, headers={**keyed, **ASYNC})
    assert queued.status_code == 202
    assert queued.json()["id"] == job.json()["id"]
    for other in (
        {"type": "embeddings", "input": {**embed, "input": "other text"}},
        {"type": "embeddings", "input": {**embed, "dimensions": 8}},
        {"type": "embeddings", "input": embed, "webhook": "http://127.0.0.1:9/hook"},
        {"type": "images.generations", "input": {"model": "demo-dit", "prompt": "x"}},
    ):
        refused = client.post("/v1/jobs", json=other, headers=keyed)
        assert refused.status_code == 409, other
        error = refused.json()["error"]
        assert error["code"] == "idempotency_key_reused"
        assert error["param"] == "Idempotency-Key"
        assert "Idempotency-Key" in error["message"]
    # The model named by an alias: the same request as by its id.
    aliased = client.post(
        "/v1/jobs",
        json={"type": "embeddings", "input": {**embed, "model": "text-embedding-3-small"}},
        headers=keyed,
    )
    assert aliased.status_code == 202
    assert aliased.json()["id"] == job.json()["id"]
    # No seed asked for: a retry is the same request, though each draws a seed of its own.
    unseeded = {"model": "demo-dit", "prompt": "any seed", "num_inference_steps": 1}
    again = {"Idempotency-Key": f"unseeded-{uuid.uuid4().hex}", **ASYNC}
    first = client.post("/v1/images/generations", json=unseeded, headers=again)
    second = client.post("/v1/images/generations", json=unseeded, headers=again)
    assert first.json()["id"] == second.json()["id"]


def test_concurrent_requests_with_one_key_all_get_its_job(stack: Stack) -> None:
    def submit(key: str) -> httpx.Response:
        body = {"type": "embeddings", "input": {"model": MODEL, "input": "at once"}}
        return httpx.post(
            f"{stack.url}/v1/jobs", json=body, headers={"Idempotency-Key": key}, timeout=30
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        for attempt in range(20):
            responses = list(pool.map(submit, [f"race-{uuid.uuid4().hex}"] * 8))
            assert [response.status_code for response in responses] == [202] * 8, attempt
            assert len({response.json()["id"] for response in responses}) == 1


def test_a_synchronous_request_with_a_key_whose_job_expired_is_a_409_at_once(
    stack: Stack, client: httpx.Client, redis_client: redis.Redis
) -> None:
    body = {"model": MODEL, "input": "long gone"}
    keyed = {"Idempotency-Key": f"gone-{uuid.uuid4().hex}"}
    job = client.post("/v1/embeddings", json=body, headers={**keyed, **ASYNC}).json()
    redis_client.delete(Keys(stack.namespace).job(job["id"]))  # its record expired, not its key
    started = time.monotonic()
    response = client.post("/v1/embeddings", json=body, headers=keyed)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "idempotency_key_expired"
    assert time.monotonic() - started < 2
