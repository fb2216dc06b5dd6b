"""GPU benchmark: Hearth's models on one CUDA device, in the worker's dtype.

1. Embeddings: all-minilm-l6-v2 from the registry, through
   ``EmbeddingModel.embed`` (tokenizing and the copy back included, as in the
   worker), at batch sizes 1 to 256 of benchmarks/sentences.py: ms per call
   and texts/s.
2. Images: demo-unet and demo-dit, written into a temporary model store,
   loaded with ``load_text_to_image`` (the worker's loader, one component
   cache) and run through ``ImageRunner`` as the worker runs them, one job of
   n images per pipeline call: seconds per call and images/s. PNG encoding,
   which the runner does on the CPU, is also timed alone for one image.
3. With ``--service``: Hearth end to end on the same device (the Stack of
   benchmarks/embeddings.py): embeddings through loadgen.py, images through
   imageload.closed_loop. It needs psutil besides Hearth.
4. Prints one Markdown table, and writes it to ``$OUT/gpu-results.md`` when
   ``OUT`` is set (or to ``--output``), rewritten after every row so a run cut
   short still leaves what it measured.

The device and dtype are the worker's own choice (``choose_placement``):
bfloat16 on a GPU that has it, else float16; float32 on the CPU. Every shape
is warmed with one unmeasured call, and CUDA is synchronised around each timed
call. A measurement that would start after ``--budget`` seconds is skipped
and marked so, so the run always ends with a table.

Run: benchmarks/gpu.sh [--quick] [--service]
     .venv/bin/python benchmarks/gpu_bench.py --device cpu --quick   (a smoke test)
"""

from __future__ import annotations

import argparse
import base64
import importlib
import io
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson
import torch
import uvloop
from imagejob import GUIDANCE, image_input
from PIL import Image
from sentences import SENTENCES

from hearth.memory import keep_freed_memory
from models.components import ComponentCache
from models.demo import DEMO_MODEL_IDS, build_demo_models
from models.device import Placement, choose_placement
from models.diffusion import load_text_to_image
from models.embedding import EmbeddingModel
from models.registry import PACKAGED_EMBEDDING_ID, Registry, packaged_embedding_path
from workers.hooks import NoHooks
from workers.images import ImageRunner, png
from workers.protocol import Job, JobStatus, JobType

EMBED_BATCHES = (1, 8, 32, 64, 128, 256)
IMAGE_BATCHES = (1, 2, 4, 8, 16)
SERVICE_CONCURRENCY = (1, 32, 64)  # embeddings requests in flight through Hearth
SERVICE_IMAGE_CONCURRENCY = (1, 8)  # image requests in flight through Hearth
MAX_BATCH_TOKENS = 16384  # the worker's default HEARTH_MAX_BATCH_TOKENS
RESULTS_NAME = "gpu-results.md"
TABLE_HEAD = (
    "| part | model | batch | calls | per call, mean | per call, p50 | rate | peak GPU memory "
    "| note |\n|---|---|---:|---:|---:|---:|---:|---:|---|"
)


@dataclass(frozen=True)
class Row:
    """One line of the results table; NaN where a value does not apply."""

    part: str
    model: str
    batch: str  # texts or images per call, or clients in flight through Hearth
    calls: int
    mean_s: float
    p50_s: float
    rate: float
    unit: str  # of ``rate``
    peak_gib: float = math.nan
    note: str = ""

    def markdown(self) -> str:
        cells = (
            self.part,
            self.model,
            self.batch,
            str(self.calls) if self.calls else "n/a",
            _duration(self.mean_s),
            _duration(self.p50_s),
            "n/a" if math.isnan(self.rate) else f"{self.rate:,.1f} {self.unit}",
            "n/a" if math.isnan(self.peak_gib) else f"{self.peak_gib:.2f} GiB",
            self.note,
        )
        return "| " + " | ".join(cells) + " |"


def _duration(seconds: float) -> str:
    if math.isnan(seconds):
        return "n/a"
    return f"{seconds * 1000:.2f} ms" if seconds < 1 else f"{seconds:.3f} s"


def skipped(part: str, model: str, batch: str, why: str) -> Row:
    nan = math.nan
    return Row(part, model, batch, 0, nan, nan, nan, "", note=f"skipped: {why}")


class Bench:
    """The device, the time budget and the table being filled."""

    def __init__(self, placement: Placement, seconds: float, budget_s: float) -> None:
        self.placement = placement
        self.seconds = seconds  # measured time per row
        self.deadline = time.monotonic() + budget_s
        self.header: list[str] = []
        self.rows: list[Row] = []
        self.output: Path | None = None

    @property
    def cuda(self) -> bool:
        return self.placement.device.type == "cuda"

    def out_of_time(self) -> bool:
        return time.monotonic() >= self.deadline

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.placement.device)

    def timed(self, call: Callable[[], object]) -> tuple[list[float], float]:
        """Seconds of each timed ``call`` (at least one, for ``self.seconds`` in all), after
        one unmeasured call; and the peak GPU memory in GiB (NaN on the CPU)."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.placement.device)
        call()  # warm this shape
        self.sync()
        times: list[float] = []
        started = time.perf_counter()
        while not times or time.perf_counter() - started < self.seconds:
            self.sync()
            began = time.perf_counter()
            call()
            self.sync()
            times.append(time.perf_counter() - began)
        peak = (
            torch.cuda.max_memory_allocated(self.placement.device) / 2**30
            if self.cuda
            else math.nan
        )
        return times, peak

    def add(self, row: Row) -> None:
        """Keep ``row``, report it on stderr, and rewrite the output file with every row so far."""
        self.rows.append(row)
        if row.calls:
            result = f"p50 {_duration(row.p50_s)} per call, {row.rate:,.1f} {row.unit}"
        else:
            result = row.note
        print(f"{row.part} {row.model} batch {row.batch}: {result}", file=sys.stderr)
        if self.output is not None:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            self.output.write_text(self.render())

    def render(self) -> str:
        lines = ["## Hearth on the GPU", "", *self.header, "", TABLE_HEAD]
        return "\n".join([*lines, *(row.markdown() for row in self.rows)]) + "\n"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def gpus() -> str:
    """nvidia-smi's name, memory and driver of every GPU, or why they are unknown."""
    query = ["--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    try:
        done = subprocess.run(
            ["nvidia-smi", *query], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nvidia-smi unavailable ({type(exc).__name__})"
    return "; ".join(line.strip() for line in done.stdout.splitlines() if line.strip())


def software() -> str:
    cuda = torch.version.cuda or "none"
    cudnn = torch.backends.cudnn.version()  # type: ignore[no-untyped-call]  # None without it
    return (
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {cuda}, "
        f"cuDNN {cudnn or 'none'}), diffusers {_version('diffusers')}, "
        f"transformers {_version('transformers')}"
    )


def describe_device(placement: Placement) -> str:
    dtype = placement.describe()["dtype"]
    if placement.device.type != "cuda":
        return f"{placement.device} ({torch.get_num_threads()} torch threads), {dtype}"
    name = torch.cuda.get_device_name(placement.device)
    total = torch.cuda.get_device_properties(placement.device).total_memory / 2**30
    return f"{placement.device} ({name}, {total:.0f} GiB), {dtype}"


def command_line() -> str:
    python = Path(sys.executable)
    if python.is_relative_to(Path.cwd()):
        python = python.relative_to(Path.cwd())
    return shlex.join([str(python), *sys.argv])


def texts(size: int, offset: int) -> list[str]:
    return [SENTENCES[(offset + i) % len(SENTENCES)] for i in range(size)]


class EmbedCalls:
    """``embed`` calls of ``size`` texts, each taking the sentences after the last call's."""

    def __init__(self, model: EmbeddingModel, size: int) -> None:
        self.model = model
        self.size = size
        self.calls = 0
        self.passes = 0  # most forward passes one call took

    def __call__(self) -> None:
        result = self.model.embed(texts(self.size, self.calls * self.size))
        self.passes = max(self.passes, len(result.batch_sizes))
        self.calls += 1


def bench_embeddings(bench: Bench, registry: Registry) -> None:
    """Texts/s and ms per ``embed`` call of the packaged model at each batch size."""
    started = time.perf_counter()
    spec = registry.get(PACKAGED_EMBEDDING_ID)
    model = EmbeddingModel(spec.path, bench.placement, max_batch_tokens=MAX_BATCH_TOKENS)
    bench.sync()
    tokens = statistics.mean(len(ids) for ids in model.tokenize(list(SENTENCES)))
    bench.header.append(
        f"- {PACKAGED_EMBEDDING_ID}: loaded in {time.perf_counter() - started:.1f} s; "
        f"{tokens:.1f} tokens per text on average (benchmarks/sentences.py), "
        f"at most {MAX_BATCH_TOKENS} padded tokens per forward pass"
    )
    for size in EMBED_BATCHES:
        if bench.out_of_time():
            bench.add(skipped("embeddings", PACKAGED_EMBEDDING_ID, str(size), "time budget"))
            continue
        embed = EmbedCalls(model, size)
        times, peak = bench.timed(embed)
        mean = statistics.mean(times)
        note = "" if embed.passes == 1 else f"up to {embed.passes} forward passes per call"
        bench.add(
            Row(
                "embeddings",
                PACKAGED_EMBEDDING_ID,
                str(size),
                len(times),
                mean,
                statistics.median(times),
                size / mean,
                "texts/s",
                peak,
                note,
            )
        )
    del model
    if bench.cuda:
        torch.cuda.empty_cache()


def image_job(model_id: str, size: int, steps: int, n: int, seed: int) -> Job:
    """One job of ``n`` images, with the input the API queues for such a request."""
    return Job(
        type=JobType.IMAGES_GENERATIONS,
        model=model_id,
        input=image_input(size, steps, seed, n),
        deadline=time.time() + 3600,
    )


def run_images(runner: ImageRunner, size: int, steps: int, n: int, seed: int) -> bytes:
    """Run one job of ``n`` images as the worker does; its result body."""
    (outcome,), calls = runner.run([image_job(runner.model_id, size, steps, n, seed)], NoHooks())
    if outcome.status is not JobStatus.SUCCEEDED or outcome.result is None:
        raise RuntimeError(f"{runner.model_id}: the job ended {outcome.status}: {outcome.error}")
    if calls != [n]:
        raise RuntimeError(f"{runner.model_id}: {n} images took pipeline calls of {calls}")
    return outcome.result


class ImageCalls:
    """Jobs of ``n`` images run through ``runner``, each with new seeds; keeps the last result."""

    def __init__(self, runner: ImageRunner, size: int, steps: int, n: int) -> None:
        self.runner = runner
        self.size = size
        self.steps = steps
        self.n = n
        self.calls = 0
        self.last = b""

    def __call__(self) -> None:
        seed = self.calls * self.n
        self.last = run_images(self.runner, self.size, self.steps, self.n, seed)
        self.calls += 1


def bench_images(
    bench: Bench, registry: Registry, size: int, steps: int, batch_invariant: bool
) -> None:
    """Seconds per pipeline call and images/s of each demo model at each batch size."""
    cache = ComponentCache()
    pipes: dict[str, Any] = {}
    for model_id in DEMO_MODEL_IDS:
        started = time.perf_counter()
        folder = registry.get(model_id).path
        pipes[model_id] = load_text_to_image(folder, bench.placement, cache, batch_invariant)
        bench.sync()
        bench.header.append(
            f"- {model_id}: loaded in {time.perf_counter() - started:.1f} s by "
            f"load_text_to_image ({type(pipes[model_id]).__name__})"
        )
    bench.header.append(
        f"- images: one job of n images per call, guidance {GUIDANCE:g} (two denoiser passes "
        "per step), the pipeline's own scheduler, CPU generators as in the worker; "
        + (
            "batch-invariant layers (HEARTH_BATCH_INVARIANT_IMAGES, the default)"
            if batch_invariant
            else "plain batched layers (HEARTH_BATCH_INVARIANT_IMAGES=false)"
        )
    )
    shape = f"{size}x{size}, {steps} steps"
    first_image: bytes | None = None
    for model_id, pipe in pipes.items():
        for n in IMAGE_BATCHES:
            if bench.out_of_time():
                bench.add(skipped("images", f"{model_id} {shape}", str(n), "time budget"))
                continue
            runner = ImageRunner(model_id, pipe, max_batch_images=n)
            generate = ImageCalls(runner, size, steps, n)
            times, peak = bench.timed(generate)
            mean = statistics.mean(times)
            bench.add(
                Row(
                    "images",
                    f"{model_id} {shape}",
                    str(n),
                    len(times),
                    mean,
                    statistics.median(times),
                    n / mean,
                    "images/s",
                    peak,
                    "worker's ImageRunner: pipeline and PNG",
                )
            )
            if first_image is None:
                item = orjson.loads(generate.last)["data"][0]
                first_image = base64.b64decode(item["b64_json"])
    if first_image is not None and not bench.out_of_time():
        bench_png(bench, first_image, size)
    del pipes, cache
    if bench.cuda:
        torch.cuda.empty_cache()


def bench_png(bench: Bench, encoded: bytes, size: int) -> None:
    """Ms to PNG-encode one generated image (on the CPU, as the worker does)."""
    image = Image.open(io.BytesIO(encoded))
    image.load()
    times, _ = bench.timed(lambda: png(image))
    mean = statistics.mean(times)
    bench.add(
        Row(
            "png",
            f"one {size}x{size} image",
            "1",
            len(times),
            mean,
            statistics.median(times),
            1 / mean,
            "images/s",
            note="CPU, part of every image row above",
        )
    )


def bench_service(bench: Bench, state_dir: Path, size: int, steps: int, quick: bool) -> None:
    """Hearth end to end: a private Redis, one worker on this device and the API."""
    try:
        from embeddings import MODEL_ID, Stack, as_level, run_level
        from imageload import closed_loop
    except ImportError as exc:
        bench.add(skipped("Hearth", "n/a", "n/a", f"--service needs {exc.name} (pip install it)"))
        return
    image_model = DEMO_MODEL_IDS[0]
    build_demo_models(state_dir / "models")  # the worker's store; kept when already written
    env = {
        "HEARTH_MODELS": f"{MODEL_ID},{image_model}",
        "HEARTH_DEVICE": str(bench.placement.device),
    }
    stack = Stack(state_dir, env)
    try:
        started = time.perf_counter()
        stack.start()
        bench.header.append(
            f"- Hearth (--service): ready in {time.perf_counter() - started:.1f} s, one worker "
            f"on {bench.placement.device} holding {MODEL_ID} and {image_model}"
        )
        warmup = 0.5 if quick else 1.0
        for concurrency in SERVICE_CONCURRENCY:
            if bench.out_of_time():
                bench.add(skipped("Hearth embeddings", MODEL_ID, f"c={concurrency}", "time budget"))
                continue
            stack.clear_batch_sizes()
            summary = run_level(stack.url, "/v1/embeddings", concurrency, 1, warmup, bench.seconds)
            level = as_level(summary, stack.batch_sizes())
            errors = f", {level.errors} errors" if level.errors else ""
            batch = level.mean_batch or 0.0
            bench.add(
                Row(
                    "Hearth embeddings",
                    MODEL_ID,
                    f"c={concurrency}",
                    level.requests,
                    math.nan,
                    level.p50_ms / 1000,
                    level.rps,
                    "requests/s",
                    note=f"1 text per request; mean worker batch {batch:.1f}{errors}",
                )
            )
        shape = f"{image_model} {size}x{size}, {steps} steps"
        for concurrency in SERVICE_IMAGE_CONCURRENCY:
            if bench.out_of_time():
                bench.add(skipped("Hearth images", shape, f"c={concurrency}", "time budget"))
                continue
            total = concurrency * (2 if quick else 4)
            uvloop.run(closed_loop(stack.url, image_model, size, steps, concurrency, concurrency))
            rate = uvloop.run(closed_loop(stack.url, image_model, size, steps, total, concurrency))
            bench.add(
                Row(
                    "Hearth images",
                    shape,
                    f"c={concurrency}",
                    total,
                    math.nan,
                    math.nan,
                    rate,
                    "images/s",
                    note="1 image per request; worker batches ≤ 8 (HEARTH_MAX_BATCH_IMAGES)",
                )
            )
    finally:
        stack.close()


def check(service: bool) -> None:
    """Import what a run needs (raising ImportError where something is missing); print versions.

    The packaged embedding model is imported only when first used, and the Stack's modules
    only with ``--service``: they are imported here too."""
    print(f"{PACKAGED_EMBEDDING_ID}: {packaged_embedding_path()}")
    if service:
        for module in ("embeddings", "imageload", "loadgen"):
            importlib.import_module(module)
    print(software())


def default_output() -> Path | None:
    out = os.environ.get("OUT")
    return Path(out) / RESULTS_NAME if out else None


def main() -> None:
    """Measure embeddings, images and optionally Hearth end to end, then print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, cpu or auto")
    parser.add_argument("--quick", action="store_true", help="short measurements, for a first look")
    parser.add_argument("--seconds", type=float, help="measured seconds per row (2; --quick 0.5)")
    parser.add_argument(
        "--budget", type=float, default=360.0, help="seconds before rows are skipped"
    )
    parser.add_argument("--size", type=int, help="image width and height (512; 64 on the CPU)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per image")
    parser.add_argument("--service", action="store_true", help="also measure Hearth end to end")
    parser.add_argument("--skip-images", action="store_true", help="embeddings only")
    parser.add_argument(
        "--no-batch-invariant",
        action="store_true",
        help="images with plain batched layers, as HEARTH_BATCH_INVARIANT_IMAGES=false",
    )
    parser.add_argument("--output", type=Path, default=default_output(), help="$OUT/gpu-results.md")
    parser.add_argument("--check", action="store_true", help="check the imports; print versions")
    args = parser.parse_args()
    if args.check:
        check(args.service)
        return

    keep_freed_memory()  # as a worker does by default
    placement = choose_placement(args.device)
    seconds = args.seconds if args.seconds is not None else (0.5 if args.quick else 2.0)
    size = args.size or (512 if placement.device.type == "cuda" else 64)
    bench = Bench(placement, seconds, args.budget)
    bench.output = args.output
    bench.header = [
        f"- command: `{command_line()}`",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- GPUs (nvidia-smi): {gpus()}",
        f"- device: {describe_device(placement)}",
        f"- software: {software()}",
        f"- method: one unmeasured call per shape, then calls for {seconds:g} s (at least one),"
        " CUDA synchronised around each; rate = batch / mean time per call",
    ]
    print("\n".join(bench.header), file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="hearth-gpu-") as tmp:
        state_dir = Path(tmp)
        store = state_dir / "models"
        if not args.skip_images:
            started = time.perf_counter()
            build_demo_models(store)
            elapsed = time.perf_counter() - started
            bench.header.append(f"- demo models written to a temporary store in {elapsed:.1f} s")
        registry = Registry.scan(store)
        bench_embeddings(bench, registry)
        if not args.skip_images:
            bench_images(bench, registry, size, args.steps, not args.no_batch_invariant)
        if args.service:
            bench_service(bench, state_dir, size, args.steps, args.quick)

    print(bench.render(), end="", flush=True)
    if bench.output is not None:
        bench.output.parent.mkdir(parents=True, exist_ok=True)
        bench.output.write_text(bench.render())
        print(f"wrote {bench.output}")


if __name__ == "__main__":
    main()
