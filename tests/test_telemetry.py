"""Request ids, timing headers, JSON logs, and the API's and workers' metrics."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.conftest import MODEL, Stack

pytestmark = pytest.mark.integration


def test_request_ids_are_kept_or_made(client: httpx.Client) -> None:
    assert (
        client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"]
        == "abc-123"
    )
    made = client.get("/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    odd = client.get("/healthz", headers={"X-Request-ID": "spaces are odd"}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", odd)


def test_synchronous_answers_say_where_the_time_went(client: httpx.Client) -> None:
    response = client.post("/v1/embeddings", json={"model": MODEL, "input": "timed"})
    assert response.status_code == 200
    queue, inference, total = (
        float(response.headers[name])
        for name in ("x-queue-time", "x-inference-time", "x-total-time")
    )
    assert 0 <= queue < total
    assert 0 < inference < total


def test_the_api_exposes_requests_and_queues(client: httpx.Client) -> None:
    client.post("/v1/embeddings", json={"model": MODEL, "input": "counted"})
    client.get("/v1/jobs/job_nothing")
    text = client.get("/metrics").text
    assert re.search(
        r'hearth_http_requests_total\{method="POST",route="/v1/embeddings",status="200"\} [1-9]',
        text,
    )
    assert 'route="/v1/jobs/{job_id}",status="404"' in text  # templates, not ids
    assert re.search(rf'hearth_queue_depth\{{model="{MODEL}"\}} \d', text)
    assert re.search(rf'hearth_live_workers\{{model="{MODEL}"\}} 1', text)
    assert "hearth_http_request_seconds_bucket" in text


def test_workers_expose_their_own_metrics(stack: Stack, client: httpx.Client) -> None:
    client.post("/v1/embeddings", json={"model": MODEL, "input": ["one", "two", "three"]})
    port = stack.env["HEARTH_WORKER_METRICS_PORT"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert re.search(rf'hearth_worker_model_load_seconds\{{model="{MODEL}"\}} [0-9.e-]+', text)
    assert re.search(rf'hearth_worker_batch_size_count\{{model="{MODEL}"\}} [1-9]', text)
    assert re.search(
        rf'hearth_worker_jobs_total\{{model="{MODEL}",status="succeeded"\}} [1-9]', text
    )
    assert re.search(r'hearth_worker_memory_bytes\{kind="resident"\} [1-9]', text)
    assert "hearth_job_queued_seconds_bucket" in text


def test_logs_are_json_with_request_and_job_ids(stack: Stack, client: httpx.Client) -> None:
    body = {
        "type": "images.generations",
        "input": {"model": "demo-unet", "prompt": "x", "size": "512x512"},
    }
    job = client.post("/v1/jobs", json=body).json()
    client.delete(f"/v1/jobs/{job['id']}", headers={"X-Request-ID": "cancel-req-1"})
    records = [json.loads(line) for line in stack.api.output().splitlines() if line.startswith("{")]
    cancelled = [r for r in records if r.get("message") == "job cancelled by the client"]
    assert cancelled and cancelled[-1]["job_id"] == job["id"]
    assert cancelled[-1]["request_id"] == "cancel-req-1"
    assert {"time", "level", "logger"} <= set(cancelled[-1])
    worker_lines = [
        json.loads(line) for line in stack.worker.output().splitlines() if line.startswith("{")
    ]
    assert any("loaded all-minilm-l6-v2" in r["message"] for r in worker_lines)
