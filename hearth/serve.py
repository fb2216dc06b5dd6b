"""`hearth serve`: the whole service on one machine, in one command.

Starts a private Redis-protocol server when REDIS_URL is unset, then one
worker and the API as child processes. Ctrl-C or SIGTERM stops them in order
(API, worker, Redis) and leaves nothing behind. Should a child (or the private
Redis) die on its own, the rest are stopped too and the exit code says so. One
`hearth serve` at a time uses a state directory: a second is refused.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from types import FrameType
from typing import IO

from hearth.embedded_redis import EmbeddedRedis
from hearth.processes import child_options, stop
from hearth.settings import Settings

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0


def ensure_image_models(settings: Settings) -> None:
    """On a store without any image model, write the demo ones, so images work at once."""
    from models.registry import ModelKind, Registry

    if any(spec.kind is ModelKind.IMAGE for spec in Registry.scan(settings.model_store)):
        return
    from models.demo import build_demo_models

    for folder in build_demo_models(settings.model_store):
        logger.info("no image model in the store: wrote the demo model %s", folder)


def hold_state_dir(settings: Settings) -> IO[str] | None:
    """Lock the state directory for this process; None when another holds it.

    The lock lasts as long as the returned file stays open (the process, at most),
    so a `hearth serve` that was killed leaves nothing to clean up.
    """
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    lock = (settings.state_dir / "serve.lock").open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        logger.error(
            "another hearth serve (pid %s) uses the state directory %s; stop it, or give "
            "this one its own HEARTH_STATE_DIR",
            holder,
            settings.state_dir,
        )
        return None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def serve(settings: Settings, host: str, port: int) -> int:
    lock = hold_state_dir(settings)
    if lock is None:
        return 2
    with lock:
        return _serve(settings, host, port)


def _serve(settings: Settings, host: str, port: int) -> int:
    settings.model_store.mkdir(parents=True, exist_ok=True)
    if not settings.models:
        ensure_image_models(settings)
    # The worker has this machine to itself (next to the API and Redis it shares
    # it with): its inference threads stay on their cores.
    env = {"HEARTH_PIN_THREADS": "1", **os.environ}
    embedded: EmbeddedRedis | None = None
    if not settings.redis_url:
        embedded = EmbeddedRedis(settings.state_dir / "redis")
        embedded.start()
        env["REDIS_URL"] = embedded.url
        logger.info("private Redis at %s, data in %s", embedded.url, embedded.data_dir)

    signals: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        signals.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    hearth = [sys.executable, "-m", "hearth"]
    children: dict[str, subprocess.Popen[bytes]] = {}
    exit_code = 0
    try:
        children["worker"] = subprocess.Popen([*hearth, "worker"], env=env, **child_options())
        children["api"] = subprocess.Popen(
            [*hearth, "api", "--host", host, "--port", str(port)], env=env, **child_options()
        )
        logger.info("Hearth on http://%s:%d (Ctrl-C stops it)", host, port)
        watched = dict(children)
        if embedded is not None and embedded.process is not None:
            watched["private Redis"] = embedded.process
        while not signals:
            died = [name for name, child in watched.items() if child.poll() is not None]
            if died:
                logger.error(
                    "%s exited with code %s; stopping", died[0], watched[died[0]].returncode
                )
                exit_code = 1
                break
            time.sleep(0.2)
    finally:
        for name in ("api", "worker"):
            if name in children:
                code = stop(children[name], STOP_TIMEOUT_S)
                logger.info("%s stopped (exit code %s)", name, code)
        if embedded is not None:
            embedded.stop()
            logger.info("private Redis stopped")
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return exit_code
