"""Liveness, readiness and the 503s: Redis down, no worker for a model."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import MODEL, Stack
from tests.model_folders import plain_encoder
from tests.support import Process, free_port, hearth_env, start_api, wait_for
from workers.protocol import Keys

pytestmark = pytest.mark.integration


def test_healthz(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_names_the_workers_holding_each_model(client: httpx.Client, stack: Stack) -> None:
    body = client.get("/readyz").json()
    assert body["status"] == "ready"
    assert len(body["models"][MODEL]) == 1
    card = client.get(f"/v1/models/{MODEL}").json()
    assert card["workers"] == body["models"][MODEL]
    assert card["kind"] == "embedding"
    assert card["dimension"] == 384


@pytest.fixture
def api_with_unheld_model(stack: Stack, tmp_path: Path, packaged_model_path: Path) -> Iterator[str]:
    """A second API on the same namespace whose store holds a model no worker has."""
    store = tmp_path / "models"
    plain_encoder(packaged_model_path, store / "unheld-encoder")
    api, url = start_api({**stack.env, "HEARTH_MODELS_DIR": str(store)}, tmp_path)
    try:
        wait_for(f"{url}/healthz", [api])
        yield url
    finally:
        api.stop()


def test_a_model_without_a_live_worker_is_a_503(api_with_unheld_model: str) -> None:
    with httpx.Client(base_url=api_with_unheld_model, timeout=30) as http:
        ready = http.get("/readyz")
        assert ready.status_code == 503
        assert "unheld-encoder" in ready.json()["error"]["message"]
        assert MODEL not in ready.json()["error"]["message"]

        response = http.post("/v1/embeddings", json={"model": "unheld-encoder", "input": "x"})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "no_worker"
        assert http.get("/v1/models/unheld-encoder").json()["workers"] == []
        # The model a worker holds is still served by this API.
        assert http.post("/v1/embeddings", json={"model": MODEL, "input": "x"}).status_code == 200


def test_redis_unreachable_is_a_prompt_503(tmp_path: Path) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    env = hearth_env(
        REDIS_URL=dead_redis, HEARTH_STATE_DIR=str(tmp_path), HEARTH_REDIS_TIMEOUT_S="1"
    )
    api, url = start_api(env, tmp_path)
    try:
        wait_for(f"{url}/healthz", [api])
        with httpx.Client(base_url=url, timeout=30) as http:
            started = time.monotonic()
            response = http.post("/v1/embeddings", json={"model": MODEL, "input": "x"})
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "queue_unavailable"
            assert time.monotonic() - started < 5
            assert http.get("/readyz").status_code == 503
            assert http.get("/healthz").status_code == 200
    finally:
        api.stop()


def test_a_stopped_worker_leaves_and_readiness_follows(
    redis_url: str, redis_client: redis.Redis, namespace: str, tmp_path: Path
) -> None:
    env = hearth_env(
        REDIS_URL=redis_url,
        HEARTH_NAMESPACE=namespace,
        HEARTH_STATE_DIR=str(tmp_path),
        HEARTH_HEARTBEAT_S="0.5",
        HEARTH_WORKER_TTL_S="3",
    )
    worker = Process(["worker"], env, tmp_path / "worker.log")
    api, url = start_api(env, tmp_path)
    try:
        wait_for(f"{url}/readyz", [worker, api])
        assert redis_client.hlen(Keys(namespace).workers()) == 1
        assert worker.stop() == 0
        assert redis_client.hlen(Keys(namespace).workers()) == 0
        wait_for(f"{url}/readyz", [api], status=503, timeout_s=10)
        assert api.stop() == 0
    finally:
        worker.stop()
        api.stop()
