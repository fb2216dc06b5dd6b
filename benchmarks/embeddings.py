"""Embeddings benchmark: Hearth, the raw model and infinity-emb, side by side.

1. Starts the raw model in a process of its own (rawmodel.py: the worker's code,
   threads and OpenMP environment), Hearth as `hearth serve` runs it (a private
   Redis-protocol server, one worker with its threads bound to the cores, one
   API), and infinity-emb (peers.py; its own virtual environment, installed on
   first use) on the same model folder.
2. Warms each server up with a few seconds of load; then, per request shape
   (one sentence, or a list of 16) and concurrency level:
   drives Hearth with loadgen.py (its own process) and reads the batch sizes
   the worker formed; times the raw model at that batch size and at the sizes
   that give its best throughput; drives infinity-emb with the same load.
   Each level's numbers are compared with the raw timings taken next to them,
   so that the machine's drift does not pass for a difference.
3. At concurrency 1, once more: pairs of one Hearth request and one raw call of
   the same sentence, request by request (``latency_pairs``).
4. Prints the tables and writes the Embeddings section of the results file.

Run: .venv/bin/python benchmarks/embeddings.py [--duration 10] [--concurrency 1,8,32,64]
     [--inputs 1,16] [--no-infinity]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import redis
import uvloop
import wakeup
from httpclient import Connection, address, post_request
from loadgen import request_bodies
from pairs import primed_pairs
from peers import Infinity, packaged_model_dir, wait_until_answers
from rawmodel import RawModel
from report import BEST_RAW_BATCHES, IDLE_MS, Level, Raw, Row, render, write_section

from hearth.embedded_redis import EmbeddedRedis, free_port
from hearth.processes import child_options, stop
from hearth.threads import openmp_environment
from workers.protocol import Keys

HERE = Path(__file__).resolve().parent
MODEL_ID = "all-minilm-l6-v2"
NAMESPACE = "bench"
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


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

    def busy_share(self, later: CpuSample) -> float:
        """Share of all cores busy between this sample and ``later``, whoever used them."""
        return (later.busy_s - self.busy_s) / ((later.at - self.at) * (os.cpu_count() or 1))

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
        self.wait_ready()

    @property
    def processes(self) -> list[subprocess.Popen[bytes]]:
        """The API, the worker and the Redis-protocol server, while running."""
        server = [self.server.process] if self.server.process is not None else []
        return [*self.children.values(), *server]

    def wait_ready(self) -> None:
        def exited() -> str | None:
            for name, child in self.children.items():
                if child.poll() is not None:
                    return f"hearth {name} exited with code {child.returncode}"
            return None

        if wait_until_answers(self.url, "/readyz", READY_TIMEOUT_S, exited):
            return
        raise RuntimeError(f"Hearth was not ready within {READY_TIMEOUT_S:g} s")

    def batch_sizes(self, model: str = MODEL_ID) -> dict[int, int]:
        """The worker's batch-size counters for ``model``."""
        assert self.redis is not None
        raw = self.redis.hgetall(Keys(NAMESPACE).batch_sizes(model))
        return {int(size): int(count) for size, count in raw.items()}

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user and system) each part has used so far, by part."""
        assert self.server.process is not None
        parts = {
            "worker": self.children["worker"].pid,
            "api": self.children["api"].pid,
            "redis": self.server.process.pid,
        }
        return {name: sum(psutil.Process(pid).cpu_times()[:2]) for name, pid in parts.items()}

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


class Contenders:
    """While in effect: ``paused`` processes stopped (SIGSTOP), then continued.

    When Hearth's processes are among them, pass its ``hearth`` Stack: on
    resuming, timers that ran out while it was stopped (its Redis reads) settle
    and it is ready again before anything else is measured.
    """

    SETTLE_S = 1.5

    def __init__(self, paused: list[subprocess.Popen[bytes]], hearth: Stack | None = None) -> None:
        self.paused = paused
        self.hearth = hearth

    def __enter__(self) -> None:
        for process in self.paused:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGSTOP)

    def __exit__(self, *_: object) -> None:
        for process in self.paused:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGCONT)
        if self.hearth is not None:
            time.sleep(self.SETTLE_S)
            self.hearth.wait_ready()


def latency_pairs(url: str, raw_model: RawModel, pairs: int) -> list[tuple[float, float]]:
    """(Hearth ms, raw ms) of ``pairs`` pairs at concurrency 1 (``pairs.primed_pairs``):
    one sentence sent to Hearth, and the same sentence embedded by the raw model.

    Here a Hearth request right after a raw call took about 0.8 ms longer than
    after a Hearth request, and a raw call right after a Hearth request 0.4-0.8 ms
    longer than after a raw call. p50s of stretches a few seconds long, taken in
    turn, put the same Hearth from 4.7 ms faster to 8.2 ms slower than the raw call.
    """
    return uvloop.run(_latency_pairs(url, raw_model, pairs))


async def _latency_pairs(url: str, raw_model: RawModel, pairs: int) -> list[tuple[float, float]]:
    host, port, path = address(url, "/v1/embeddings")
    requests = [post_request(host, port, path, body) for body in request_bodies(MODEL_ID, 1)]
    connection = Connection(host, port)

    async def hearth(sentence: int) -> float:
        return await connection.timed_ok(requests[sentence % len(requests)], PAIR_TIMEOUT_S)

    try:
        for sentence in range(PAIR_WARMUP):
            await hearth(sentence)
            raw_model.call_ms(sentence)
        return await primed_pairs(range(pairs), hearth, raw_model.call_ms)
    finally:
        connection.close()


def run_level(
    url: str, path: str, concurrency: int, inputs: int, warmup_s: float, duration_s: float
) -> dict[str, Any]:
    """Drive one server at one concurrency with loadgen.py; its JSON summary."""
    command = [
        sys.executable,
        str(HERE / "loadgen.py"),
        *("--url", url, "--path", path, "--model", MODEL_ID),
        *("--concurrency", str(concurrency), "--inputs", str(inputs)),
        *("--warmup", str(warmup_s), "--duration", str(duration_s)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed ({done.returncode}):\n{done.stderr}")
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return summary


def cpu_per_request(
    before: dict[str, float], after: dict[str, float], summary: dict[str, Any]
) -> dict[str, float]:
    """Milliseconds of CPU per request of each Hearth part and of the load generator,
    over a level's whole run (warmup included)."""
    used = {name: after[name] - before[name] for name in after}
    used["loadgen"] = summary["cpu_s"]
    completed = max(1, summary["completed"])
    return {name: seconds * 1000 / completed for name, seconds in used.items()}


def as_level(
    summary: dict[str, Any],
    batch_sizes: dict[int, int] | None = None,
    cpu_ms: dict[str, float] | None = None,
    busy: float | None = None,
) -> Level:
    return Level(
        concurrency=summary["concurrency"],
        inputs=summary["inputs"],
        requests=summary["requests"],
        errors=summary["errors"],
        rps=summary["rps"],
        inputs_per_s=summary["inputs_per_s"],
        p50_ms=summary["p50_ms"],
        p90_ms=summary["p90_ms"],
        p99_ms=summary["p99_ms"],
        error_sample=summary["error_sample"],
        batch_sizes=batch_sizes or {},
        cpu_ms=cpu_ms or {},
        busy=busy,
    )


def command_line() -> str:
    """This run's command as typed, the interpreter relative to the working directory."""
    python = Path(sys.executable)
    if python.is_relative_to(Path.cwd()):
        python = python.relative_to(Path.cwd())
    return shlex.join([str(python), *sys.argv])


# Concurrency 1 against the raw call, once more, request by request: this many
# pairs of one Hearth request and one raw call, after PAIR_WARMUP unmeasured ones.
LATENCY_PAIRS = 200
PAIR_WARMUP = 20
PAIR_TIMEOUT_S = 30.0

# A level's measured window holds at least this many rounds of every client.
ROUNDS_PER_WINDOW = 3


def level_window(
    warmup_s: float, duration_s: float, texts_in_flight: int, texts_per_s: float
) -> tuple[float, float]:
    """The warmup and measured seconds of a level with ``texts_in_flight`` texts
    outstanding, when texts go at ``texts_per_s`` at best.

    A closed loop of 64 clients sending 16 texts each holds 1,024 texts in
    flight, several seconds of work on a small CPU: in a fixed 10 s window its
    clients would each finish a request or two, and the rate would read low
    by whatever the window cuts off. The warmup lasts one round of every
    client at least, the window ROUNDS_PER_WINDOW rounds."""
    round_s = texts_in_flight / texts_per_s
    return max(warmup_s, round_s), max(duration_s, ROUNDS_PER_WINDOW * round_s)


def main() -> None:
    """Per level: Hearth, then the raw model, then infinity-emb; then report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per level")
    parser.add_argument("--concurrency", default="1,8,32,64", help="comma-separated levels")
    parser.add_argument("--inputs", default="1,16", help="comma-separated texts per request")
    parser.add_argument("--raw-seconds", type=float, default=2.0, help="seconds per raw timing")
    parser.add_argument("--no-infinity", action="store_true", help="leave infinity-emb out")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    concurrencies = [int(part) for part in args.concurrency.split(",") if part.strip()]
    input_counts = [int(part) for part in args.inputs.split(",") if part.strip()]
    command = command_line()
    # Hearth as `hearth serve` runs it: one worker, its threads bound to the cores.
    # A worker stopped while another contender is measured must not count as gone.
    hearth_env = {
        "HEARTH_MODELS": MODEL_ID,
        "HEARTH_PIN_THREADS": "1",
        "HEARTH_WORKER_TTL_S": "3600",
    }
    raw_env = {**hearth_env, **openmp_environment(pin=True)}

    with (
        contextlib.ExitStack() as running,
        tempfile.TemporaryDirectory(prefix="hearth-bench-") as tmp,
    ):
        raw_model = running.enter_context(RawModel(raw_env))
        stack = Stack(Path(tmp), env=hearth_env)
        running.callback(stack.close)
        stack.start()
        infinity = None
        if not args.no_infinity:
            infinity = running.enter_context(Infinity(Path(tmp), model_dir=packaged_model_dir()))
        raw = Raw()
        rows: list[Row] = []
        # Only the contender measured runs: the others are stopped (SIGSTOP), as
        # even idle servers wake up now and then (an idle infinity-emb alone
        # added ~2 ms to Hearth's p50 at concurrency 1).
        others = infinity.processes if infinity is not None else []
        hearth_only = Contenders(others)
        everyone_else = Contenders([*stack.processes, *others], stack)
        infinity_only = Contenders(stack.processes, stack)
        # Every server warmed alike before the first measured level, at a middle load.
        with hearth_only:
            run_level(stack.url, "/v1/embeddings", 8, 1, args.warmup, args.warmup * 2)
        if infinity is not None:
            with infinity_only:
                run_level(infinity.url, infinity.path, 8, 1, args.warmup, args.warmup * 2)
        started = CpuSample.now()
        with everyone_else:
            # What a hop between processes costs here, which a raw call never pays.
            wake_up = wakeup.summary(wakeup.probe())
            raw.p50_ms = raw_model.latency_ms(args.warmup / 2, args.duration / 2)
            raw.idle_p50_ms = raw_model.latency_ms(args.warmup / 2, args.duration / 2, IDLE_MS)
            # How fast texts can go at best, to size the windows of the heavy levels.
            ceiling = raw_model.throughput(max(BEST_RAW_BATCHES), args.raw_seconds).texts_per_s
        for inputs in input_counts:
            for concurrency in concurrencies:
                warmup, duration = level_window(
                    args.warmup, args.duration, concurrency * inputs, ceiling
                )
                with hearth_only:
                    stack.clear_batch_sizes()
                    cpu_before, machine_before = stack.cpu_seconds(), CpuSample.now()
                    summary = run_level(
                        stack.url, "/v1/embeddings", concurrency, inputs, warmup, duration
                    )
                    busy = machine_before.busy_share(CpuSample.now())
                    cpu_ms = cpu_per_request(cpu_before, stack.cpu_seconds(), summary)
                    level = as_level(summary, stack.batch_sizes(), cpu_ms, busy)
                # The raw model right after, at the batch the worker formed and at
                # the sizes that give its best throughput.
                with everyone_else:
                    near = [
                        raw_model.throughput(size, args.raw_seconds)
                        for size in sorted({level.rounded_batch or 1, *BEST_RAW_BATCHES})
                    ]
                raw.timings += near
                peer = None
                if infinity is not None:
                    with infinity_only:
                        summary = run_level(
                            infinity.url,
                            infinity.path,
                            concurrency,
                            inputs,
                            warmup,
                            duration,
                        )
                    peer = as_level(summary)
                rows.append(Row(level, peer, near))
                print(rows[-1].summary(raw), flush=True)
        if 1 in concurrencies and 1 in input_counts:
            # Once more, next to the last levels: the two raw latencies bracket the run.
            with everyone_else:
                again = raw_model.latency_ms(args.warmup / 2, args.duration / 2)
                idle_again = raw_model.latency_ms(args.warmup / 2, args.duration / 2, IDLE_MS)
            raw.p50_ms = min(raw.p50_ms, again)
            raw.idle_p50_ms = min(raw.idle_p50_ms, idle_again)

            with hearth_only:
                raw.paired = latency_pairs(stack.url, raw_model, LATENCY_PAIRS)
        foreign = started.foreign_share(CpuSample.now())
        peer_versions = (
            f"infinity-emb {infinity.version} (torch {infinity.torch_version})"
            if infinity is not None
            else "infinity-emb not run"
        )
        threads = int(raw_model.info["torch_threads"])

    section = render(command, MODEL_ID, threads, foreign, rows, raw, peer_versions, wake_up)
    print(section)
    write_section(args.output, section)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
