"""`hearth serve` as a user runs it: one command, everything up, Ctrl-C stops all."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import openai
import psutil
import pytest

from tests.conftest import MODEL
from tests.support import Process, free_port, hearth_env, wait_for

pytestmark = pytest.mark.integration


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def ctrl_c(process: Process, timeout_s: float = 60) -> int:
    """What a terminal does on Ctrl-C: SIGINT to the foreground process group."""
    os.killpg(os.getpgid(process.pid), signal.SIGINT)
    return process.popen.wait(timeout_s)


def test_serve_on_its_embedded_default(tmp_path: Path) -> None:
    port = free_port()
    state = tmp_path / "state"
    serve = Process(
        ["serve", "--port", str(port)],
        hearth_env(HEARTH_STATE_DIR=str(state)),
        tmp_path / "serve.log",
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/readyz", [serve])
        children = descendants(serve.pid)
        names = " ".join(" ".join(child.cmdline()) for child in children)
        assert "valkey-server" in names
        assert "hearth worker" in names and "hearth api" in names

        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0
        )
        result = client.embeddings.create(model=MODEL, input=["embedded default", "works"])
        assert len(result.data) == 2
        # With no image model in the store, serve wrote the demo ones and serves them.
        assert {"demo-unet", "demo-dit"} <= {p.name for p in (state / "models").iterdir()}
        image = client.images.generate(model="demo-dit", prompt="a first image", size="64x64")  # type: ignore[arg-type]
        assert image.data and image.data[0].b64_json
        client.close()

        assert ctrl_c(serve) in (0, 130)
        _gone, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, f"left behind: {alive}"
        assert any((state / "redis").rglob("*.aof*")), (
            "the private Redis keeps its data in the state dir"
        )
        output = serve.output()
        assert "private Redis stopped" in output
        # Every line is one of Hearth's JSON records, the libraries' warnings included:
        # none prints past them in a format of its own (transformers, diffusers).
        lines = [line for line in output.splitlines() if line.strip()]
        assert all(isinstance(json.loads(line), dict) for line in lines), output
        assert "torchvision" not in output
    finally:
        serve.stop()


def test_serve_uses_redis_url_when_set(redis_url: str, namespace: str, tmp_path: Path) -> None:
    port = free_port()
    env = hearth_env(
        REDIS_URL=redis_url, HEARTH_NAMESPACE=namespace, HEARTH_STATE_DIR=str(tmp_path / "s")
    )
    serve = Process(["serve", "--port", str(port)], env, tmp_path / "serve.log")
    try:
        wait_for(f"http://127.0.0.1:{port}/readyz", [serve])
        names = " ".join(" ".join(child.cmdline()) for child in descendants(serve.pid))
        assert "valkey-server" not in names
        assert not (tmp_path / "s" / "redis").exists()
        assert ctrl_c(serve) in (0, 130)
    finally:
        serve.stop()


@pytest.mark.parametrize(
    ("child", "said"),
    [("hearth api", "api exited"), ("valkey-server", "private Redis exited")],
)
def test_serve_stops_everything_when_a_child_dies(tmp_path: Path, child: str, said: str) -> None:
    port = free_port()
    serve = Process(
        ["serve", "--port", str(port)],
        hearth_env(HEARTH_STATE_DIR=str(tmp_path)),
        tmp_path / "serve.log",
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz", [serve])
        children = descendants(serve.pid)
        next(c for c in children if child in " ".join(c.cmdline())).kill()
        assert serve.popen.wait(60) == 1
        assert said in serve.output()
        _gone, alive = psutil.wait_procs(children, timeout=5)
        assert not alive
    finally:
        serve.stop()


def test_serve_on_a_port_in_use_stops_with_the_reason(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        serve = Process(
            ["serve", "--port", str(port)],
            hearth_env(HEARTH_STATE_DIR=str(tmp_path)),
            tmp_path / "serve.log",
        )
        try:
            assert serve.popen.wait(90) == 1  # the API could not listen: it exited at once
            assert "address already in use" in serve.output()
            assert "api exited" in serve.output()
        finally:
            serve.stop()


def test_a_second_serve_on_one_state_directory_is_refused(tmp_path: Path) -> None:
    first_port = free_port()
    env = hearth_env(HEARTH_STATE_DIR=str(tmp_path))
    first = Process(["serve", "--port", str(first_port)], env, tmp_path / "first.log")
    try:
        wait_for(f"http://127.0.0.1:{first_port}/healthz", [first])
        second = Process(["serve", "--port", str(free_port())], env, tmp_path / "second.log")
        try:
            assert second.popen.wait(30) == 2
            assert f"another hearth serve (pid {first.pid})" in second.output()
        finally:
            second.stop()
        first.check_alive()  # untouched
        assert ctrl_c(first) in (0, 130)
    finally:
        first.stop()
