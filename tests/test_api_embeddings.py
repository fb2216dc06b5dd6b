"""`POST /v1/embeddings` through the API, Redis and a worker, all real."""

from __future__ import annotations

import asyncio
import base64
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from models.device import choose_placement
from models.embedding import EmbeddingModel
from tests.conftest import MODEL, Stack
from workers.protocol import CONSUMER_GROUP, Job, JobType, Keys

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def direct(packaged_model_path: Path) -> EmbeddingModel:
    return EmbeddingModel(packaged_model_path, choose_placement("cpu"), max_batch_tokens=16384)


def embed(client: httpx.Client, **body: object) -> httpx.Response:
    return client.post("/v1/embeddings", json={"model": MODEL, **body})


def vectors_of(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [item["index"] for item in data] == list(range(len(data)))
    return np.array([item["embedding"] for item in data], dtype=np.float32)


def test_a_string_gives_one_embedding_equal_to_the_model(
    client: httpx.Client, direct: EmbeddingModel
) -> None:
    response = embed(client, input="The cat sat on the mat.")
    body = response.json()
    assert body["object"] == "list"
    assert body["model"] == MODEL
    assert body["data"][0]["object"] == "embedding"
    np.testing.assert_allclose(
        vectors_of(response), direct.embed(["The cat sat on the mat."]).vectors, atol=1e-5
    )
    tokens = direct.embed(["The cat sat on the mat."]).token_counts[0]
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_a_list_comes_back_in_input_order(client: httpx.Client, direct: EmbeddingModel) -> None:
    texts = ["short", "a much longer sentence than the others, " * 5, "medium length text here"]
    got = vectors_of(embed(client, input=texts))
    np.testing.assert_allclose(got, direct.embed(texts).vectors, atol=1e-5)
    counts = direct.embed(texts).token_counts
    assert embed(client, input=texts).json()["usage"]["prompt_tokens"] == sum(counts)


def test_base64_is_little_endian_float32_of_the_same_vectors(client: httpx.Client) -> None:
    texts = ["one", "two"]
    floats = vectors_of(embed(client, input=texts))
    encoded = embed(client, input=texts, encoding_format="base64").json()["data"]
    decoded = np.stack(
        [np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in encoded]
    )
    np.testing.assert_array_equal(decoded, floats)


def test_dimensions_truncate_then_renormalise(client: httpx.Client) -> None:
    full = vectors_of(embed(client, input=["dimension test"]))
    cut = vectors_of(embed(client, input=["dimension test"], dimensions=32))
    assert cut.shape == (1, 32)
    np.testing.assert_allclose(np.linalg.norm(cut), 1.0, atol=1e-6)
    np.testing.assert_allclose(cut[0], full[0, :32] / np.linalg.norm(full[0, :32]), atol=1e-6)


def test_concurrent_requests_are_batched_and_answered_each_their_own(
    stack: Stack, redis_client: redis.Redis, direct: EmbeddingModel
) -> None:
    texts = [f"request number {i} talks about subject {i * 7 % 13}" for i in range(48)]
    expected = direct.embed(texts).vectors
    stats_key = Keys(stack.namespace).batch_sizes(MODEL)
    redis_client.delete(stats_key)

    def one(i: int) -> np.ndarray:
        with stack.client as http:
            return vectors_of(embed(http, input=texts[i]))[0]

    with ThreadPoolExecutor(max_workers=16) as pool:
        got = np.stack(list(pool.map(one, range(len(texts)))))

    np.testing.assert_allclose(got, expected, atol=1e-5)
    sizes = {int(size): int(count) for size, count in redis_client.hgetall(stats_key).items()}
    assert sum(size * count for size, count in sizes.items()) == len(texts)
    assert max(sizes) > 1, f"no request was batched with another: {sizes}"


def test_a_burst_of_more_requests_than_redis_connections_all_succeed(stack: Stack) -> None:
    # More requests at once than one API process opens Redis connections (128):
    # the rest wait for a connection instead of failing.
    burst = 300

    async def send_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=burst)
        async with httpx.AsyncClient(base_url=stack.url, timeout=120.0, limits=limits) as http:
            return await asyncio.gather(
                *(
                    http.post("/v1/embeddings", json={"model": MODEL, "input": f"burst {i}"})
                    for i in range(burst)
                )
            )

    with ThreadPoolExecutor(max_workers=1) as thread:  # a browser test's loop may run here
        responses = thread.submit(asyncio.run, send_all()).result()
    statuses = Counter(response.status_code for response in responses)
    assert statuses == {200: burst}, [r.text for r in responses if r.status_code != 200][:3]


@pytest.mark.parametrize(
    ("model", "body"),
    [
        (MODEL, {"input": ["never embedded"], "encoding_format": "float", "dimensions": None}),
        (
            "demo-dit",
            {
                "prompt": "never drawn",
                "negative_prompt": "",
                "n": 1,
                "width": 64,
                "height": 64,
                "steps": 2,
                "guidance": 4.5,
                "seed": 1,
                "scheduler": None,
                "response_format": "b64_json",
            },
        ),
    ],
)
def test_a_job_cancelled_before_its_pickup_never_counts_as_run(
    stack: Stack, redis_client: redis.Redis, model: str, body: dict[str, object]
) -> None:
    # A synchronous request's batch is computed while its jobs are being marked
    # running; a job found cancelled by then must stay cancelled, its result dropped.
    keys = Keys(stack.namespace)
    kind = JobType.EMBEDDINGS if model == MODEL else JobType.IMAGES_GENERATIONS
    job = Job(
        type=kind,
        model=model,
        input=body,
        deadline=time.time() + 60,
        reply_to=keys.replies("a-listener-that-gave-up"),
    )
    redis_client.hset(keys.job(job.id), mapping={**job.hash_fields(), "status": "cancelled"})
    redis_client.xadd(keys.stream(model), {"job": job.to_json()})
    deadline = time.monotonic() + 30
    while (
        redis_client.xlen(keys.stream(model))
        or redis_client.xpending(keys.stream(model), CONSUMER_GROUP)["pending"]
    ):
        assert time.monotonic() < deadline, "the worker never took the entry"
        time.sleep(0.05)
    record = redis_client.hgetall(keys.job(job.id))
    assert record[b"status"] == b"cancelled"
    assert b"result" not in record
    assert b"started_at" not in record
    assert record[b"attempts"] == b"0"


def test_a_job_is_stored_with_a_ttl_and_leaves_nothing_pending(
    stack: Stack, client: httpx.Client, redis_client: redis.Redis
) -> None:
    keys = Keys(stack.namespace)
    before = set(redis_client.scan_iter(match=keys.job("*"), count=1000))
    vectors_of(embed(client, input="stored and acknowledged"))
    new = set(redis_client.scan_iter(match=keys.job("*"), count=1000)) - before
    assert len(new) == 1
    key = new.pop()
    record = redis_client.hgetall(key)
    assert record[b"status"] == b"succeeded"
    assert record[b"attempts"] == b"1"
    assert b'"object":"list"' in record[b"result"]
    assert 0 < redis_client.ttl(key) <= 3600
    stream = keys.stream(MODEL)
    assert redis_client.xpending(stream, CONSUMER_GROUP)["pending"] == 0
    assert redis_client.xlen(stream) == 0


def error_of(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    error: dict[str, object] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"input": []}, "input", "non-empty"),
        ({"input": 42}, "input", "string"),
        ({"input": [1, 2, 3]}, "input", "token arrays"),
        ({"input": [[1, 2]]}, "input", "token arrays"),
        ({"input": ["ok", None]}, "input[1]", "valid string"),
        ({"input": [True]}, "input[0]", "valid string"),
        ({"input": ""}, "input", "empty"),
        ({"input": ["ok", ""]}, "input[1]", "empty"),
        ({"input": "x", "encoding_format": "hex"}, "encoding_format", "float"),
        ({"input": "x", "dimensions": 0}, "dimensions", "greater than or equal to 1"),
        ({"input": "x", "dimensions": 385}, "dimensions", "1 to 384"),
        ({"input": "x", "dimensions": "many"}, "dimensions", "integer"),
        ({"input": "x", "dimensions": "8"}, "dimensions", "integer"),
        ({"input": "x", "dimensions": True}, "dimensions", "integer"),
        ({"input": "x", "dimensions": 8.0}, "dimensions", "integer"),
        ({"input": ["x"] * 2049}, "input", "at most 2048"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(
    client: httpx.Client, body: dict[str, object], param: str, words: str
) -> None:
    error = error_of(embed(client, **body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] == "invalid_value"  # the schema's checks and the route's alike
    assert words in str(error["message"])


# JSON's \u escapes can spell a lone UTF-16 surrogate: valid JSON, not valid text.
@pytest.mark.parametrize(
    ("content", "param"),
    [
        (b'{"model": "all-minilm-l6-v2", "input": "a\\ud800b"}', "input"),
        (b'{"model": "all-minilm-l6-v2", "input": ["ok", "a\\udfffb"]}', "input[1]"),
        (b'{"model": "all-minilm-l6-v2", "input": "a", "user": "\\ud800"}', "user"),
        (b'{"model": "x\\ud800", "input": "a"}', "model"),
    ],
)
@pytest.mark.parametrize("prefer", [None, "respond-async"])
def test_a_lone_surrogate_is_a_400_naming_the_field(
    client: httpx.Client, content: bytes, param: str, prefer: str | None
) -> None:
    headers = {"content-type": "application/json", **({"prefer": prefer} if prefer else {})}
    response = client.post("/v1/embeddings", content=content, headers=headers, timeout=10)
    error = error_of(response, 400)
    assert error["param"] == param
    assert "lone UTF-16 surrogate" in str(error["message"])
    # The good requests around it are answered as ever.
    vectors_of(embed(client, input="after a bad one"))


def test_a_surrogate_pair_is_valid_text(client: httpx.Client) -> None:
    content = b'{"model": "all-minilm-l6-v2", "input": "a\\ud83d\\ude00b"}'
    response = client.post(
        "/v1/embeddings", content=content, headers={"content-type": "application/json"}
    )
    vectors_of(response)


def test_a_missing_model_field_is_named(client: httpx.Client) -> None:
    error = error_of(client.post("/v1/embeddings", json={"input": "x"}), 400)
    assert error["param"] == "model"


@pytest.mark.parametrize(
    "content", [b'{"model": "all-minilm-l6-v2", "input": ', b"[1, 2]", b"not json"]
)
def test_malformed_bodies_are_a_400(client: httpx.Client, content: bytes) -> None:
    response = client.post(
        "/v1/embeddings", content=content, headers={"content-type": "application/json"}
    )
    error = error_of(response, 400)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "content",
    [b'{"model": "all-minilm-l6-v2", "input": "\xff\xfe"}', b"[" * 100_000 + b"]" * 100_000],
)
def test_a_body_json_cannot_parse_is_invalid_json(client: httpx.Client, content: bytes) -> None:
    # Not UTF-8, or nested deeper than the parser goes: FastAPI's own parse error.
    response = client.post(
        "/v1/embeddings", content=content, headers={"content-type": "application/json"}
    )
    error = error_of(response, 400)
    assert error["code"] == "invalid_json"
    assert str(error["message"]).startswith("The request body is not valid JSON: ")


def test_an_unknown_model_is_a_404(client: httpx.Client) -> None:
    error = error_of(
        client.post("/v1/embeddings", json={"model": "no-such-model", "input": "x"}), 404
    )
    assert error["param"] == "model"
    assert error["code"] == "model_not_found"


def test_unknown_routes_and_methods_use_the_envelope(client: httpx.Client) -> None:
    assert error_of(client.get("/v1/nothing-here"), 404)["code"] == "route_not_found"
    response = client.get("/v1/embeddings")
    assert error_of(response, 405)["code"] == "method_not_allowed"
    assert response.headers["allow"] == "POST"
