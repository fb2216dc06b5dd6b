"""Running real Hearth processes from tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import httpx

HEARTH = [sys.executable, "-m", "hearth"]

T = TypeVar("T")


def run_on_own_thread(
    main: Callable[[], Awaitable[T]], runner: Callable[[Awaitable[T]], T] = asyncio.run
) -> T:
    """``runner(main())`` on a thread of its own, so that it never meets an event
    loop the test session left running in the main thread (the browser tests'
    Playwright keeps one there)."""
    with ThreadPoolExecutor(max_workers=1) as thread:
        return thread.submit(lambda: runner(main())).result()


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (held open together while chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def hearth_env(**overrides: str) -> dict[str, str]:
    """The test process's environment without any Hearth or Redis settings, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_") and k != "REDIS_URL"}
    env.update(HF_HUB_OFFLINE="1", HEARTH_LOG_LEVEL="info")
    env.update(overrides)
    return env


class Process:
    """A `hearth …` child process whose output goes to a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args = args
        self.log = log
        self._log_file = log.open("ab")
        self.popen = subprocess.Popen(
            [*HEARTH, *args],
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            command = " ".join(self.args)
            raise AssertionError(
                f"hearth {command} exited with {self.popen.returncode}:\n{self.output()[-4000:]}"
            )

    def stop(self, timeout_s: float = 20.0) -> int:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log_file.close()
        return self.popen.returncode


def start_api(env: dict[str, str], folder: Path, port: int | None = None) -> tuple[Process, str]:
    """A `hearth api` on ``port`` (default: a free one), logging into ``folder``; its URL."""
    port = port or free_port()
    api = Process(["api", "--port", str(port)], env, folder / f"api-{port}.log")
    return api, f"http://127.0.0.1:{port}"


def wait_for(
    url: str, processes: list[Process], status: int = 200, timeout_s: float = 120.0
) -> httpx.Response:
    """Poll ``url`` until it answers ``status``; fail early if a process died."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        for process in processes:
            process.check_alive()
        try:
            response = httpx.get(url, timeout=2.0)
            if response.status_code == status:
                return response
            last = response.text
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer {status} in {timeout_s} s; last: {last}")


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch on one CPU thread inside the block. The demo models are tiny: one
    thread is as fast as two, and unlike two it stays fast (~0.2 s a call, not
    seconds) when other processes busy the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
