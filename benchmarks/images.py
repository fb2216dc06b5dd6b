"""Images benchmark: Hearth's overhead, batching and memory with the demo models.

1. Builds demo-unet and demo-dit into a temporary model store and starts a
   private Redis, one worker holding both models and the API (the Stack of
   benchmarks/embeddings.py), with the same torch thread count as this process.
2. Overhead, per model at two sizes (--size and --large-size): one image at a
   time, each made in this process through ImageRunner (PNG encoding included,
   as in the worker) and through `POST /v1/images/generations` a moment
   apart, each measured call right after an unmeasured one of its own kind;
   the median of the pairs' ratios is the overhead. The job records split
   Hearth's time into phases.
3. Batching, per model: images/s through Hearth at concurrency 8 against 1,
   and the images per pipeline call the worker counted.
4. Memory: RSS of fresh workers holding demo-unet, demo-dit and both; the
   component cache as seen in this process.
5. Prints the tables and writes the Images section of the results file.

Run: .venv/bin/python benchmarks/images.py [--requests 24] [--size 64] [--large-size 256]
     [--steps 20]
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import psutil
import torch
import uvloop
import wakeup
from embeddings import NAMESPACE, READY_TIMEOUT_S, STOP_TIMEOUT_S, CpuSample, Stack, command_line
from imagejob import image_input
from imageload import Sent, alternating, closed_loop, job_phases
from images_report import NAME, Batching, Memory, Overhead, Round, Setup, render
from report import write_section

from hearth.memory import keep_freed_memory
from hearth.processes import child_options, stop
from models import library_logs

# Before diffusers is imported (models.demo, models.diffusion): its pipeline modules
# warn as they load, and transformers would print them in a format of its own.
library_logs.adopt("transformers", "diffusers")

from models.components import ComponentCache  # noqa: E402
from models.demo import DEMO_MODEL_IDS, build_demo_models  # noqa: E402
from models.device import choose_placement  # noqa: E402
from models.diffusion import load_text_to_image  # noqa: E402
from workers.hooks import NoHooks  # noqa: E402
from workers.images import ImageRunner  # noqa: E402
from workers.protocol import Job, JobStatus, JobType, Keys  # noqa: E402

HERE = Path(__file__).resolve().parent
# Rounds of images, each image made in-process and through Hearth back to back.
# On a shared 2-core machine one minute runs up to 25% slower than the next, and
# rounds of one side then of the other left the verdicts to chance: the two
# calls of a pair share their moment's speed.
ROUNDS = 5
WARMUP = 3  # unmeasured pairs per model before the first round
ROUND_WARMUP = 1  # and before every later one (Hearth: a new connection)
CONCURRENCY = 8
MAX_BATCH_IMAGES = 8  # the worker's default HEARTH_MAX_BATCH_IMAGES
MIN_LARGE_REQUESTS = 8  # images per overhead round at the large size, at least
SETTLE_S = 5.0  # how long the worker's batch counters may lag the last reply


def raw_call(runner: ImageRunner, size: int, steps: int, seed: int) -> float:
    """Ms of ``runner.run([job], NoHooks())`` for one image of ``seed``."""
    job = Job(
        type=JobType.IMAGES_GENERATIONS,
        model=runner.model_id,
        input=image_input(size, steps, seed),
        deadline=time.time() + 3600,
    )
    started = time.perf_counter()
    (outcome,), _ = runner.run([job], NoHooks())
    ms = (time.perf_counter() - started) * 1000
    if outcome.status is not JobStatus.SUCCEEDED:
        raise RuntimeError(f"{runner.model_id}: raw call ended {outcome.status}")
    return ms


def measure_overhead(
    stack: Stack, runner: ImageRunner, size: int, steps: int, requests: int
) -> Overhead:
    """Rounds of ``requests`` images, each made in-process and through Hearth in turn;
    phases of the best Hearth round."""
    model, seeds = runner.model_id, list(range(requests))
    raw: list[Round] = []
    calls: list[list[Sent]] = []
    for index in range(ROUNDS):
        warmup = WARMUP if index == 0 else ROUND_WARMUP
        raw_ms, sent = uvloop.run(
            alternating(
                stack.url,
                model,
                size,
                steps,
                seeds,
                warmup,
                lambda seed: raw_call(runner, size, steps, seed),
            )
        )
        raw.append(Round(tuple(raw_ms)))
        calls.append(sent)
        print(
            f"{model} {size}x{size} round {index + 1}: raw {raw[-1].mean:.1f} ms, "
            f"Hearth {Round(tuple(c.ms for c in calls[-1])).mean:.1f} ms",
            flush=True,
        )
    hearth = [Round(tuple(call.ms for call in round_calls)) for round_calls in calls]
    best_calls = calls[min(range(ROUNDS), key=lambda i: hearth[i].mean)]
    assert stack.redis is not None
    return Overhead(model, size, raw, hearth, job_phases(stack.redis, NAMESPACE, model, best_calls))


def _counted(stack: Stack, model: str, images: int) -> dict[int, int]:
    """The worker's batch counters for ``model`` once they account for ``images`` images."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        sizes = stack.batch_sizes(model)
        if sum(size * count for size, count in sizes.items()) >= images:
            return sizes
        if time.monotonic() > deadline:
            raise RuntimeError(f"{model}: the worker counted {sizes} for {images} images")
        time.sleep(0.05)


def _add(total: dict[int, int], sizes: dict[int, int]) -> None:
    for size, count in sizes.items():
        total[size] = total.get(size, 0) + count


def measure_batching(stack: Stack, model: str, size: int, steps: int, requests: int) -> Batching:
    """Images/s at concurrency 1 and ``CONCURRENCY``, alternating ``ROUNDS`` times."""
    uvloop.run(closed_loop(stack.url, model, size, steps, CONCURRENCY, CONCURRENCY))  # warm
    rates: dict[int, list[float]] = {1: [], CONCURRENCY: []}
    sizes: dict[int, dict[int, int]] = {1: {}, CONCURRENCY: {}}
    for index in range(ROUNDS):
        for concurrency in (1, CONCURRENCY):
            stack.clear_batch_sizes(model)
            rate = uvloop.run(closed_loop(stack.url, model, size, steps, requests, concurrency))
            rates[concurrency].append(rate)
            _add(sizes[concurrency], _counted(stack, model, requests))
        print(
            f"{model} batching round {index + 1}: c=1 {rates[1][-1]:.2f} images/s, "
            f"c={CONCURRENCY} {rates[CONCURRENCY][-1]:.2f} images/s",
            flush=True,
        )
    return Batching(model, CONCURRENCY, rates[1], rates[CONCURRENCY], sizes[1], sizes[CONCURRENCY])


def _ready_models(stack: Stack, namespace: str) -> list[str]:
    """The models a live worker in ``namespace`` reports holding, sorted."""
    assert stack.redis is not None
    beats = stack.redis.hvals(Keys(namespace).workers())
    return sorted(model for beat in beats for model in orjson.loads(beat)["models"])


def worker_rss_mib(stack: Stack, threads: int) -> dict[str, float]:
    """RSS of fresh workers holding each demo model and both, once their heartbeat lists them.

    The workers start together, each in its own namespace of the stack's Redis."""
    sets = [*([model] for model in DEMO_MODEL_IDS), sorted(DEMO_MODEL_IDS)]
    env = {
        **os.environ,
        "REDIS_URL": stack.server.url,
        "HEARTH_STATE_DIR": str(stack.state_dir),
        "HEARTH_LOG_LEVEL": "warning",
        "HEARTH_TORCH_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
    }
    workers: dict[str, subprocess.Popen[bytes]] = {}  # namespace → its worker
    try:
        for index, models in enumerate(sets):
            namespace = f"{NAMESPACE}-rss-{index}"
            command = [sys.executable, "-m", "hearth", "worker"]
            worker_env = {**env, "HEARTH_NAMESPACE": namespace, "HEARTH_MODELS": ",".join(models)}
            workers[namespace] = subprocess.Popen(command, env=worker_env, **child_options())
        rss: dict[str, float] = {}  # namespace → RSS in MiB
        deadline = time.monotonic() + READY_TIMEOUT_S
        while len(rss) < len(workers):
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not ready within {READY_TIMEOUT_S:g} s")
            for (namespace, process), models in zip(workers.items(), sets, strict=True):
                if process.poll() is not None:
                    raise RuntimeError(f"worker for {models} exited with {process.returncode}")
                if namespace not in rss and _ready_models(stack, namespace) == models:
                    rss[namespace] = psutil.Process(process.pid).memory_info().rss / 2**20
            time.sleep(0.2)
        return {" + ".join(m): rss[ns] for ns, m in zip(workers, sets, strict=True)}
    finally:
        for process in workers.values():
            stop(process, STOP_TIMEOUT_S)


def _weights_kib(module: Any) -> float:
    tensors = [*module.parameters(), *module.buffers()]
    return float(sum(t.numel() * t.element_size() for t in tensors)) / 1024


def _pipeline_kib(pipe: Any) -> float:
    modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    return sum(_weights_kib(module) for module in modules)


def main() -> None:
    """Measure overhead, batching and memory, then report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=24, help="images per measurement")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument(
        "--size", type=int, default=64, help="image width and height for batching and overhead"
    )
    parser.add_argument(
        "--large-size",
        type=int,
        default=256,
        help="a second image size for overhead, where the pipeline call does more work; 0: none",
    )
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's own")
    args = parser.parse_args()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    keep_freed_memory()  # the raw calls below run as the worker runs them (its default)
    command = command_line()
    # Larger images take longer: fewer of them per round, for about the same time.
    overhead_requests = {args.size: args.requests}
    if args.large_size and args.large_size != args.size:
        scaled = round(args.requests * (args.size / args.large_size) ** 2)
        overhead_requests[args.large_size] = max(MIN_LARGE_REQUESTS, scaled)

    with tempfile.TemporaryDirectory(prefix="hearth-bench-images-") as tmp:
        store = Path(tmp) / "models"
        build_demo_models(store)
        env = {"HEARTH_MODELS": ",".join(DEMO_MODEL_IDS), "HEARTH_TORCH_THREADS": str(threads)}
        samples = [CpuSample.now()]
        stack = Stack(Path(tmp), env)
        try:
            stack.start()
            cache = ComponentCache()
            placement = choose_placement("cpu")
            pipes = {m: load_text_to_image(store / m, placement, cache) for m in DEMO_MODEL_IDS}
            runners = {m: ImageRunner(m, pipe, MAX_BATCH_IMAGES) for m, pipe in pipes.items()}
            wake_up = wakeup.summary(wakeup.probe())
            samples.append(CpuSample.now())
            overheads = [
                measure_overhead(stack, runner, size, args.steps, count)
                for size, count in overhead_requests.items()
                for runner in runners.values()
            ]
            samples.append(CpuSample.now())
            batching = [
                measure_batching(stack, model, args.size, args.steps, args.requests)
                for model in DEMO_MODEL_IDS
            ]
            samples.append(CpuSample.now())
            rss = worker_rss_mib(stack, threads)
        finally:
            stack.close()
        samples.append(CpuSample.now())

    unet, dit = (pipes[model] for model in DEMO_MODEL_IDS)
    memory = Memory(
        rss_mib=rss,
        cache_entries=len(cache),
        vae_shared=unet.vae is dit.vae,
        vae_kib=_weights_kib(unet.vae),
        weights_kib={model: _pipeline_kib(pipe) for model, pipe in pipes.items()},
    )
    phases = ("start and load", "overhead", "batching", "memory")
    foreign = {
        phase: before.foreign_share(after)
        for phase, (before, after) in zip(phases, itertools.pairwise(samples), strict=True)
    }
    setup = Setup(
        command,
        threads,
        args.size,
        args.steps,
        args.requests,
        overhead_requests,
        ROUNDS,
        WARMUP,
        foreign,
        wake_up,
    )
    section = render(setup, overheads, batching, memory)
    print(section)
    write_section(args.output, section, NAME)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
