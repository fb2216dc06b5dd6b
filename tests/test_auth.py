"""API keys and rate limits, on an API process of their own."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import MODEL
from tests.support import HEARTH, hearth_env, start_api, wait_for

pytestmark = pytest.mark.integration

KEYS = ("key-alpha-123", "key-beta-456")


@pytest.fixture
def keyed_api(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[str]:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# keys for the team\n{KEYS[1]}\n\n")
    env = hearth_env(
        REDIS_URL=redis_url,
        HEARTH_NAMESPACE=namespace,
        HEARTH_STATE_DIR=str(tmp_path),
        HEARTH_API_KEYS=KEYS[0],
        HEARTH_API_KEYS_FILE=str(keys_file),
        HEARTH_RATE_LIMIT_PER_S="2",
        HEARTH_RATE_LIMIT_BURST="3",
    )
    api, url = start_api(env, tmp_path)
    try:
        wait_for(f"{url}/healthz", [api])
        yield url
        assert not any(key in api.output() for key in KEYS), "a key reached the log"
    finally:
        api.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_routes_need_a_key_but_probes_and_docs_do_not(keyed_api: str) -> None:
    with httpx.Client(base_url=keyed_api) as http:
        for response in (
            http.get("/v1/models"),
            http.get("/v1/models", headers=bearer("key-wrong")),
            http.get("/v1/models", headers={"Authorization": "Basic a2V5LWFscGhhLTEyMw=="}),
            http.post("/v1/embeddings", json={"model": "x", "input": "y"}),
            http.get("/v1/jobs/job_x"),
        ):
            assert response.status_code == 401
            assert response.json()["error"]["type"] == "authentication_error"
            assert response.headers["www-authenticate"] == "Bearer"
        for key in KEYS:  # one from the variable, one from the file
            assert http.get("/v1/models", headers=bearer(key)).status_code == 200
        assert http.get("/healthz").status_code == 200
        assert http.get("/readyz").status_code in (200, 503)
        assert http.get("/openapi.json").status_code == 200
        assert http.get("/docs").status_code == 200


def test_a_request_without_its_key_is_refused_before_its_body_is_read(keyed_api: str) -> None:
    with httpx.Client(base_url=keyed_api) as http:
        for response in (
            http.post(
                "/v1/embeddings", content=b"{not json", headers={"Content-Type": "application/json"}
            ),
            http.post("/v1/embeddings", json={"input": 42}),
            http.get("/v1/no-such-route"),
        ):
            assert response.status_code == 401, response.text
            assert response.json()["error"]["code"] == "invalid_api_key"
        malformed = http.post(
            "/v1/embeddings",
            content=b"{not json",
            headers={**bearer(KEYS[0]), "Content-Type": "application/json"},
        )
        assert malformed.status_code == 400  # with the key, the body is read and refused


def test_the_openai_client_passes_its_key(keyed_api: str) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed_api}/v1", api_key="nope", max_retries=0).models.list()
    client = openai.OpenAI(base_url=f"{keyed_api}/v1", api_key=KEYS[0], max_retries=0)
    assert [model.id for model in client.models.list()]


def test_each_key_has_its_own_rate_limit(keyed_api: str) -> None:
    with httpx.Client(base_url=keyed_api) as http:
        statuses = [http.get("/v1/models", headers=bearer(KEYS[0])).status_code for _ in range(6)]
        assert statuses[:3] == [200, 200, 200]  # the burst
        assert 429 in statuses[3:]
        refused = http.get("/v1/models", headers=bearer(KEYS[0]))
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limited"
        assert int(refused.headers["retry-after"]) >= 1
        # Another key is not held back by the first one's use.
        assert http.get("/v1/models", headers=bearer(KEYS[1])).status_code == 200


def test_an_unreadable_keys_file_stops_the_api(tmp_path: Path) -> None:
    env = hearth_env(
        REDIS_URL="redis://127.0.0.1:1/0",
        HEARTH_STATE_DIR=str(tmp_path),
        HEARTH_API_KEYS_FILE=str(tmp_path / "missing"),
    )
    result = subprocess.run(
        [*HEARTH, "api", "--port", "1"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "HEARTH_API_KEYS_FILE" in result.stderr


def test_each_key_has_idempotency_keys_of_its_own(keyed_api: str) -> None:
    def embed(http: httpx.Client, key: str, text: str) -> httpx.Response:
        headers = {**bearer(key), "Idempotency-Key": "order-42", "Prefer": "respond-async"}
        return http.post("/v1/embeddings", json={"model": MODEL, "input": text}, headers=headers)

    with httpx.Client(base_url=keyed_api) as http:
        alice = embed(http, KEYS[0], "alice's text")
        # Bob sending Alice's very request with her key's name gets a job of his own.
        bob = embed(http, KEYS[1], "alice's text")
        assert alice.status_code == bob.status_code == 202
        assert bob.json()["id"] != alice.json()["id"]
        assert embed(http, KEYS[0], "alice's text").json()["id"] == alice.json()["id"]
        reused = embed(http, KEYS[0], "other text")
        assert reused.status_code == 409
        assert reused.json()["error"]["code"] == "idempotency_key_reused"
