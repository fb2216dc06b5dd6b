"""Embeddings benchmark: Hearth end to end against the raw model, on this machine.

1. Starts a private Redis-protocol server, `hearth worker` and `hearth api`.
2. Per concurrency level, runs benchmarks/loadgen.py (its own process) against
   `POST /v1/embeddings`, and reads which batch sizes the worker used.
3. Stops the stack, then times the same model in this process: batch-1 latency
   and throughput at the batch sizes the worker used.
4. Prints the tables and writes the Embeddings section of the results file.

Run: .venv/bin/python benchmarks/embeddings.py [--duration 10] [--concurrency 1,8,32,64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
import redis
import torch
from report import Level, RawResult, render, write_section
from sentences import SENTENCES

from hearth.embedded_redis import EmbeddedRedis, free_port
from hearth.processes import child_options, stop
from models.device import choose_placement
from models.embedding import EmbeddingModel
from models.registry import Registry
from workers.protocol import Keys

HERE = Path(__file__).resolve().parent
MODEL_ID = "all-minilm-l6-v2"
NAMESPACE = "bench"
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
RAW_BATCH_SIZES = (1, 8, 32, 64)


@dataclass(frozen=True)
class CpuSample:
    """Machine-wide busy CPU time next to this process tree's own, at one moment."""

    at: float  # time.monotonic()
    busy_s: float  # every core's non-idle time, from /proc/stat
    own_s: float  # this process, its waited-for children and its live descendants

    @classmethod
    def now(cls) -> CpuSample:
        """Sample now; busy_s is NaN where /proc/stat is missing."""
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
            user, nice, system, _idle, _iowait, irq, softirq = map(int, fields[:7])
            busy = (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError):
            busy = float("nan")
        own = sum(
            usage.ru_utime + usage.ru_stime
            for usage in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        )
        for child in psutil.Process().children(recursive=True):
            try:
                times = child.cpu_times()
            except psutil.Error:  # it ended meanwhile; counted once waited for
                continue
            own += times.user + times.system + times.children_user + times.children_system
        return cls(time.monotonic(), busy, own)

    def foreign_share(self, later: CpuSample) -> float:
        """Share of all cores that other processes used between this sample and ``later``.

        A child that ended between the samples counts as own only once waited for."""
        foreign = (later.busy_s - self.busy_s) - (later.own_s - self.own_s)
        return max(0.0, foreign) / ((later.at - self.at) * (os.cpu_count() or 1))


class Stack:
    """A private Redis, one worker and one API, started and stopped together.

    ``env`` is added to both processes' environment (e.g. ``HEARTH_MODELS``)."""

    def __init__(self, state_dir: Path, env: Mapping[str, str] | None = None) -> None:
        self.state_dir = state_dir
        self.extra_env = dict(env or {})
        self.server = EmbeddedRedis(state_dir / "redis")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.redis: redis.Redis | None = None

    def start(self) -> None:
        """Start every part and wait until /readyz answers 200."""
        self.server.start()
        self.redis = redis.Redis.from_url(self.server.url)
        env = {
            **os.environ,
            "REDIS_URL": self.server.url,
            "HEARTH_STATE_DIR": str(self.state_dir),
            "HEARTH_NAMESPACE": NAMESPACE,
            "HEARTH_LOG_LEVEL": "warning",
            "HF_HUB_OFFLINE": "1",
            **self.extra_env,
        }
        hearth_cmd = [sys.executable, "-m", "hearth"]
        for name, args in (("worker", ["worker"]), ("api", ["api", "--port", str(self.port)])):
            self.children[name] = subprocess.Popen([*hearth_cmd, *args], env=env, **child_options())
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        with httpx.Client(base_url=self.url, timeout=2.0) as client:
            while time.monotonic() < deadline:
                for name, child in self.children.items():
                    if child.poll() is not None:
                        raise RuntimeError(f"hearth {name} exited with code {child.returncode}")
                try:
                    if client.get("/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.25)
        raise RuntimeError(f"Hearth was not ready within {READY_TIMEOUT_S:g} s")

    def batch_sizes(self, model: str = MODEL_ID) -> dict[int, int]:
        """The worker's batch-size counters for ``model``."""
        assert self.redis is not None
        raw = self.redis.hgetall(Keys(NAMESPACE).batch_sizes(model))
        return {int(size): int(count) for size, count in raw.items()}

    def clear_batch_sizes(self, model: str = MODEL_ID) -> None:
        """Reset ``model``'s batch-size counters before a measurement."""
        assert self.redis is not None
        self.redis.delete(Keys(NAMESPACE).batch_sizes(model))

    def close(self) -> None:
        """Stop the API, then the worker, then the server; safe after a partial start."""
        for name in ("api", "worker"):
            if name in self.children:
                stop(self.children.pop(name), STOP_TIMEOUT_S)
        if self.redis is not None:
            self.redis.close()
            self.redis = None
        self.server.stop()


def run_level(stack: Stack, concurrency: int, warmup_s: float, duration_s: float) -> Level:
    """Drive Hearth at one concurrency with loadgen.py and collect its batch sizes."""
    stack.clear_batch_sizes()
    command = [
        sys.executable,
        str(HERE / "loadgen.py"),
        *("--url", stack.url, "--model", MODEL_ID, "--concurrency", str(concurrency)),
        *("--warmup", str(warmup_s), "--duration", str(duration_s)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed ({done.returncode}):\n{done.stderr}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return Level(
        concurrency=concurrency,
        requests=summary["requests"],
        errors=summary["errors"],
        rps=summary["rps"],
        p50_ms=summary["p50_ms"],
        p90_ms=summary["p90_ms"],
        p99_ms=summary["p99_ms"],
        error_sample=summary["error_sample"],
        batch_sizes=stack.batch_sizes(),
    )


def _batch(size: int, offset: int) -> list[str]:
    return [SENTENCES[(offset + i) % len(SENTENCES)] for i in range(size)]


def raw_latency_ms(model: EmbeddingModel, warmup_s: float, seconds: float) -> float:
    """p50 of ``model.embed([sentence])`` in ms, after ``warmup_s`` of the same calls."""
    latencies: list[float] = []
    warm_until = time.perf_counter() + warmup_s
    end = warm_until + seconds
    call = 0
    while (now := time.perf_counter()) < end:
        model.embed(_batch(1, call))
        call += 1
        if now >= warm_until:
            latencies.append(time.perf_counter() - now)
    return float(np.percentile(latencies, 50)) * 1000


def raw_throughput(model: EmbeddingModel, batch_size: int, seconds: float) -> RawResult:
    """Texts per second of back-to-back ``model.embed`` calls of ``batch_size`` texts."""
    model.embed(_batch(batch_size, 0))  # warm this shape
    calls = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        model.embed(_batch(batch_size, calls * batch_size))
        calls += 1
    return RawResult(batch_size, calls * batch_size / elapsed, elapsed / calls * 1000)


def command_line() -> str:
    """This run's command as typed, the interpreter relative to the working directory."""
    python = Path(sys.executable)
    if python.is_relative_to(Path.cwd()):
        python = python.relative_to(Path.cwd())
    return shlex.join([str(python), *sys.argv])


def main() -> None:
    """Run every level through Hearth, then the raw model, then report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per level")
    parser.add_argument("--concurrency", default="1,8,32,64", help="comma-separated levels")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    concurrencies = [int(part) for part in args.concurrency.split(",") if part.strip()]
    command = command_line()

    with tempfile.TemporaryDirectory(prefix="hearth-bench-") as tmp:
        started = CpuSample.now()
        stack = Stack(Path(tmp))
        try:
            stack.start()
            levels: list[Level] = []
            for concurrency in concurrencies:
                levels.append(run_level(stack, concurrency, args.warmup, args.duration))
                print(f"concurrency {concurrency}: {levels[-1].rps:.1f} req/s", flush=True)
        finally:
            stack.close()
        hearth_done = CpuSample.now()
        spec = Registry.scan(Path(tmp) / "models").get(MODEL_ID)
        model = EmbeddingModel(spec.path, choose_placement("cpu"), max_batch_tokens=16384)
        raw_p50_ms = raw_latency_ms(model, args.warmup, args.duration / 2)
        used = {size for level in levels if (size := level.rounded_batch) is not None}
        sizes = sorted(used | set(RAW_BATCH_SIZES))
        raw = {size: raw_throughput(model, size, max(1.0, args.duration / 4)) for size in sizes}
        foreign = {
            "Hearth levels": started.foreign_share(hearth_done),
            "raw model": hearth_done.foreign_share(CpuSample.now()),
        }

    section = render(command, MODEL_ID, torch.get_num_threads(), foreign, levels, raw, raw_p50_ms)
    print(section)
    write_section(args.output, section)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
