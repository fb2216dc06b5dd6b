"""Fixtures: a real Redis, and a running Hearth (API + worker) against it.

Redis comes from REDIS_URL, else the machine's 127.0.0.1:6379. Every test
works in its own key namespace and removes its keys afterwards; a test that
stops Redis or counts what it serves takes a private server instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from playwright.sync_api import Browser, sync_playwright

from hearth.embedded_redis import EmbeddedRedis
from tests.support import Process, free_ports, hearth_env, start_api, wait_for

MODEL = "all-minilm-l6-v2"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"  # screenshots; git-ignored
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
WEBHOOK_SECRET = "test-webhook-secret"


def _redis_url() -> str:
    return os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = _redis_url()
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.ConnectionError as exc:
        pytest.exit(
            f"Redis at {url} does not answer ({exc}); start it or set REDIS_URL", returncode=3
        )
    return url


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis-protocol server of this test's own, for a test that stops it, restarts
    it or counts what it serves, which the shared one would mix with other tests'."""
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _drop_namespace(client: redis.Redis, namespace: str) -> None:
    keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture
def namespace(redis_client: redis.Redis) -> Iterator[str]:
    """A key namespace of this test's own, removed afterwards."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    _drop_namespace(redis_client, name)


@dataclass
class Stack:
    """A running API and worker sharing one namespace."""

    url: str
    namespace: str
    env: dict[str, str]
    api: Process
    worker: Process

    @property
    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60.0)


# The stack's models also answer to the names of OpenAI's models, as a deployment
# that existing OpenAI clients call unchanged would set them up.
MODELS_FILE = """\
models:
  all-minilm-l6-v2:
    aliases: [text-embedding-3-small]
  demo-unet:
    aliases: [dall-e-2]
"""


@pytest.fixture(scope="session")
def stack(
    redis_url: str, redis_client: redis.Redis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("stack")
    from models.demo import build_demo_models

    build_demo_models(root / "models")
    (root / "models" / "models.yaml").write_text(MODELS_FILE)
    namespace = f"test-{uuid.uuid4().hex[:10]}"
    api_port, metrics_port = free_ports(2)
    env = hearth_env(
        REDIS_URL=redis_url,
        HEARTH_NAMESPACE=namespace,
        HEARTH_STATE_DIR=str(root / "state"),
        HEARTH_MODELS_DIR=str(root / "models"),
        HEARTH_HEARTBEAT_S="0.5",
        HEARTH_WORKER_TTL_S="3",
        HEARTH_WEBHOOK_SECRET=WEBHOOK_SECRET,
        HEARTH_TORCH_THREADS="1",
        HEARTH_WORKER_METRICS_PORT=str(metrics_port),
    )
    worker = Process(["worker"], env, root / "worker.log")
    api, url = start_api(env, root, api_port)
    try:
        wait_for(f"{url}/readyz", [worker, api])
        yield Stack(url=url, namespace=namespace, env=env, api=api, worker=worker)
    finally:
        api.stop()
        worker.stop()
        _drop_namespace(redis_client, namespace)


@pytest.fixture
def client(stack: Stack) -> Iterator[httpx.Client]:
    with stack.client as http:
        yield http


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store holding the two demo pipelines; tests only read it."""
    from models.demo import build_demo_models

    folder = tmp_path_factory.mktemp("demo-store")
    build_demo_models(folder)
    return folder


@pytest.fixture(scope="session")
def packaged_model_path() -> Path:
    from models.registry import packaged_embedding_path

    return packaged_embedding_path()


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install it with `apt-get install -y chromium`")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()
