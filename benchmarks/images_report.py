"""The images benchmark's results, and their Markdown section in RESULTS.md."""

from __future__ import annotations

import platform
import statistics
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata

from imagejob import GUIDANCE
from imageload import PHASES
from report import FOREIGN_CPU_LIMIT, machine, marks

import hearth

NAME = "images"
OVERHEAD_TARGET_PCT = 3.0  # the median image's time through Hearth over raw's, minus one
BATCHING_TARGET = 1.3  # images/s at concurrency 8 over images/s at concurrency 1
SPREAD_LIMIT = 0.15  # round means further apart than this make an overhead figure noisy


@dataclass(frozen=True)
class Round:
    """Milliseconds per image of one round of sequential calls."""

    ms: tuple[float, ...]

    @property
    def mean(self) -> float:
        """Mean ms per image."""
        return statistics.fmean(self.ms)

    @property
    def median(self) -> float:
        """Median ms per image."""
        return statistics.median(self.ms)


def best(rounds: list[Round]) -> Round:
    """The round with the lowest mean: the one least disturbed by anything else."""
    return min(rounds, key=lambda r: r.mean)


@dataclass(frozen=True)
class Overhead:
    """One model's images one at a time: in-process rounds against rounds through Hearth."""

    model: str
    size: int  # width and height of every image
    raw: list[Round]
    hearth: list[Round]
    phases_ms: list[float]  # mean ms per imageload.PHASES entry, best Hearth round

    def _pairs(self) -> list[tuple[float, float]]:
        """(raw ms, Hearth ms) of every image, both made back to back."""
        return [
            pair
            for raw, hearth in zip(self.raw, self.hearth, strict=True)
            for pair in zip(raw.ms, hearth.ms, strict=True)
        ]

    def by_order(self) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
        """The (raw ms, Hearth ms) pairs made raw first, and those made Hearth first
        (``imageload.alternating`` takes turns, raw first)."""
        raw_first: list[tuple[float, float]] = []
        hearth_first: list[tuple[float, float]] = []
        for raw_round, hearth_round in zip(self.raw, self.hearth, strict=True):
            for index, pair in enumerate(zip(raw_round.ms, hearth_round.ms, strict=True)):
                (hearth_first if index % 2 else raw_first).append(pair)
        return raw_first, hearth_first

    @property
    def percent(self) -> float:
        """The median over images of (Hearth ms / raw ms - 1) * 100, each image's two
        calls made a moment apart, each after one of its own kind: the overhead,
        free of the machine's drift between minutes, which a comparison of separate
        rounds is not."""
        return statistics.median((h / r - 1) * 100 for r, h in self._pairs())

    @property
    def fixed_ms(self) -> float:
        """What Hearth adds per image: the median over images of Hearth ms - raw ms."""
        return statistics.median(h - r for r, h in self._pairs())

    @property
    def total_percent(self) -> float:
        """(all Hearth ms / all raw ms - 1) * 100, over every image."""
        pairs = self._pairs()
        return (sum(h for _, h in pairs) / sum(r for r, _ in pairs) - 1) * 100

    @property
    def best_percent(self) -> float:
        """(best Hearth round mean / best raw round mean - 1) * 100."""
        return (best(self.hearth).mean / best(self.raw).mean - 1) * 100

    @property
    def spread(self) -> float:
        """How far apart one side's round means are: the larger max / min - 1 of the two."""
        sides = (self.raw, self.hearth)
        return max(max(r.mean for r in s) / min(r.mean for r in s) - 1 for s in sides)


def mean_images(sizes: dict[int, int]) -> float | None:
    """Mean images per pipeline call from the worker's counters; None when it ran none."""
    calls = sum(sizes.values())
    return sum(size * count for size, count in sizes.items()) / calls if calls else None


@dataclass(frozen=True)
class Batching:
    """One model through Hearth at concurrency 1 and at ``concurrency``."""

    model: str
    concurrency: int
    one_ips: list[float]  # images/s per round at concurrency 1
    many_ips: list[float]  # images/s per round at ``concurrency``
    one_sizes: dict[int, int]  # images per call → calls, every concurrency-1 round
    many_sizes: dict[int, int]  # the same for every round at ``concurrency``

    @property
    def ratio(self) -> float:
        """Best images/s at ``concurrency`` over the best at concurrency 1."""
        return max(self.many_ips) / max(self.one_ips)


@dataclass(frozen=True)
class Memory:
    """Worker RSS per set of models, and the component cache seen in this process."""

    rss_mib: dict[str, float]  # the models a fresh worker loaded → its RSS; both last
    cache_entries: int  # len(ComponentCache) after loading both models with one cache
    vae_shared: bool  # pipe_a.vae is pipe_b.vae
    vae_kib: float  # the VAE's parameters and buffers
    weights_kib: dict[str, float]  # each pipeline's parameters and buffers, VAE included


@dataclass(frozen=True)
class Setup:
    """How the run was made."""

    command: str
    threads: int
    size: int
    steps: int
    requests: int
    overhead_requests: dict[int, int]  # image size → images per overhead round
    rounds: int
    warmup: int
    foreign: dict[str, float]  # phase → share of all cores other processes used
    wake_up: str  # wakeup.summary() of a probe before the measurements


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _sizes(sizes: dict[int, int]) -> str:
    return ", ".join(f"{size}x{count}" for size, count in sorted(sizes.items())) or "none"


def _verdict(met: bool, caveat: str) -> str:
    return ("**met**" if met else "**NOT met**") + caveat


def _overhead_rows(overheads: list[Overhead]) -> list[str]:
    rows = []
    for o in overheads:
        raw, hearth_round = best(o.raw), best(o.hearth)
        cells = [
            o.model,
            f"{o.size}x{o.size}",
            f"{raw.median:.1f}",
            f"{raw.mean:.1f}",
            f"{hearth_round.median:.1f}",
            f"{hearth_round.mean:.1f}",
            f"{o.percent:+.1f}%",
            f"{o.total_percent:+.1f}%",
            f"{o.best_percent:+.1f}%",
            f"{o.fixed_ms:+.1f}",
            " / ".join(f"{r.mean:.0f}" for r in o.raw),
            " / ".join(f"{r.mean:.0f}" for r in o.hearth),
        ]
        rows.append(f"| {' | '.join(cells)} |")
    return rows


def _order_rows(overheads: list[Overhead]) -> list[str]:
    rows = []
    for o in overheads:
        cells = [o.model, f"{o.size}x{o.size}"]
        for pairs, made_hearth_first in zip(o.by_order(), (False, True), strict=True):
            raw = statistics.median(r for r, _ in pairs)
            hearth = statistics.median(h for _, h in pairs)
            first, then = (hearth, raw) if made_hearth_first else (raw, hearth)
            added = statistics.median(h - r for r, h in pairs)
            cells += [f"{first:.1f}", f"{then:.1f}", f"{added:+.1f}"]
        rows.append(f"| {' | '.join(cells)} |")
    return rows


def _phase_rows(overheads: list[Overhead]) -> list[str]:
    return [
        f"| {o.model} | {o.size}x{o.size} | {' | '.join(f'{ms:.1f}' for ms in o.phases_ms)} | "
        f"{sum(o.phases_ms):.1f} | {best(o.raw).mean:.1f} |"
        for o in overheads
    ]


def _batching_rows(batching: list[Batching]) -> list[str]:
    return [
        f"| {b.model} | {max(b.one_ips):.2f} | {max(b.many_ips):.2f} | {b.ratio:.2f}x | "
        f"{_fmt(mean_images(b.one_sizes), 2)} | {_fmt(mean_images(b.many_sizes), 2)} | "
        f"{_sizes(b.many_sizes)} |"
        for b in batching
    ]


def _memory_lines(memory: Memory) -> list[str]:
    *singles, both = memory.rss_mib.values()
    weights = ", ".join(f"{model} {kib:.0f} KiB" for model, kib in memory.weights_kib.items())
    return [
        "| worker loaded | RSS MiB |",
        "|---|---:|",
        *(f"| {models} | {mib:.1f} |" for models, mib in memory.rss_mib.items()),
        "",
        f"The worker holding both models: {both - max(singles):+.1f} MiB against the larger "
        "single-model one. In this process, both models loaded with one "
        f"`ComponentCache`: `len(cache)` = {memory.cache_entries}, `pipe_a.vae is "
        f"pipe_b.vae`: {memory.vae_shared}. The shared VAE holds {memory.vae_kib:.0f} KiB of "
        f"weights, which is what sharing saves here; the pipelines hold {weights} of weights "
        "in all (VAE included). These demo models are tiny, so the saving is small next to "
        "the RSS of any worker, which is almost all Python, torch and diffusers themselves.",
    ]


def _targets(setup: Setup, overheads: list[Overhead], batching: list[Batching]) -> list[str]:
    disturbed = max(setup.foreign.values(), default=0.0)
    caveat = (
        f" (unreliable: other processes used up to {disturbed:.0%} of the CPU during the run)"
        if disturbed > FOREIGN_CPU_LIMIT
        else ""
    )
    lines = [
        f"- Overhead, {o.model} at {o.size}x{o.size}: the median image took "
        f"{o.percent:+.1f}% ({o.fixed_ms:+.1f} ms) through Hearth against the same image "
        f"made in-process just before or after (all images: {o.total_percent:+.1f}%; best "
        f"rounds: {o.best_percent:+.1f}%) (target ≤ {OVERHEAD_TARGET_PCT:g}%): "
        + _verdict(o.percent <= OVERHEAD_TARGET_PCT, caveat)
        + (
            f" (noisy: one side's round means differ by up to {o.spread:.0%})"
            if o.spread > SPREAD_LIMIT
            else ""
        )
        + "."
        for o in overheads
    ]
    lines += [
        f"- Batching, {b.model}: {max(b.many_ips):.2f} images/s at concurrency {b.concurrency}"
        f" vs {max(b.one_ips):.2f} at concurrency 1 = {b.ratio:.2f}x (target ≥ "
        f"{BATCHING_TARGET:g}x): " + _verdict(b.ratio >= BATCHING_TARGET, caveat) + "."
        for b in batching
    ]
    return lines


def render(
    setup: Setup, overheads: list[Overhead], batching: list[Batching], memory: Memory
) -> str:
    """The Images section as Markdown, markers included."""
    start, end = marks(NAME)
    versions = ", ".join(
        [f"Python {platform.python_version()}"]
        + [f"{name} {metadata.version(name)}" for name in ("torch", "diffusers", "transformers")]
        + [f"hearth {hearth.__version__}"]
    )
    n = setup.requests
    per_size = ", ".join(
        f"{count} at {size}x{size}" for size, count in setup.overhead_requests.items()
    )
    many = batching[0].concurrency if batching else 0
    lines = [
        start,
        "## Images",
        "",
        f"- Command: `{setup.command}`",
        f"- Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {machine(setup.threads)}",
        f"- Wake-up: {setup.wake_up}",
        f"- Versions: {versions}",
        f"- Torch threads: {setup.threads}, in this process (`torch.set_num_threads`) and in "
        f"the worker (`HEARTH_TORCH_THREADS={setup.threads}`)",
        f"- Models: demo-unet and demo-dit (random weights, built by `models.demo`); "
        f"{setup.steps} steps, guidance {GUIDANCE:g}, one prompt, each image its own seed; "
        f"batching at {setup.size}x{setup.size}",
        "- Hearth: a private Redis, one worker holding both models, one API, all on this "
        "machine; clients use benchmarks/httpclient.py (keep-alive, httptools) from this process",
        "- CPU used by other processes (share of all cores): "
        + ", ".join(f"{phase} {share:.0%}" for phase, share in setup.foreign.items())
        + f"; above {FOREIGN_CPU_LIMIT:.0%}, the numbers below are disturbed",
        "",
        "### Overhead: one image at a time",
        "",
        "Raw is `ImageRunner.run([job], NoHooks())` in this process: the pipeline call plus "
        "PNG and base64 encoding, as the worker runs it. Hearth is `POST "
        "/v1/images/generations` (`b64_json`), one request at a time. Per model and size, "
        f"{setup.rounds} rounds ({per_size} images) make each image both ways, each "
        "measured call right after an unmeasured one of its own kind: raw, raw, Hearth, "
        "Hearth, then Hearth, Hearth, raw, raw for the next image, and so on. A pipeline "
        "call leaves its OpenMP threads spinning for milliseconds after it: so neither side "
        "starts while the other's threads spin, and each runs as it does making images back "
        "to back. Unmeasured pairs go first "
        f"({setup.warmup} before the first round, 1 before the others). Overhead = the "
        "median over images of Hearth's time over raw's for the same image, minus 1: the "
        "two calls of a pair share the machine's speed of that moment, which drifts by tens "
        "of percent from one minute to the next. All images = the sum of Hearth's times "
        "over the sum of raw's, minus 1; best rounds = the lowest Hearth round mean over "
        "the lowest raw round mean, minus 1 (rounds listed at the right, the p50 and mean "
        "columns are of those best rounds); added ms = the median over images of Hearth's "
        "time minus raw's. What Hearth adds (HTTP in, queue, store, reply, HTTP out) is a "
        "few milliseconds whatever the image, so its share falls as the pipeline call "
        "grows: the smallest size shows these tiny demo models at their worst.",
        "",
        "| model | size | raw p50 ms | raw mean ms | Hearth p50 ms | Hearth mean ms | overhead "
        "| all images | best rounds | added ms | raw round means | Hearth round means |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *_overhead_rows(overheads),
        "",
        "The same pairs by which side went first (p50 ms): raw, raw, Hearth, Hearth, or "
        "Hearth, Hearth, raw, raw. Both orders measure each side after its own kind; "
        "where they disagree, the side that went first was helped or hurt by what the "
        "other side left behind two calls earlier.",
        "",
        "| model | size | raw first: raw | then Hearth | added ms | Hearth first: Hearth "
        "| then raw | added ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *_order_rows(overheads),
        "",
        "Where a Hearth request's time goes (mean ms, best Hearth round), from the client's "
        "clock and the job record's `created_at` (API), `started_at` and `finished_at` "
        "(worker):",
        "",
        f"| model | size | {' | '.join(PHASES)} | total | raw mean |",
        "|---|---|" + "---:|" * (len(PHASES) + 2),
        *_phase_rows(overheads),
        "",
        "### Batching",
        "",
        f"Images/s through Hearth: {n} requests from 1 client, and {n} from {many} "
        "clients sending back to back "
        f"(same size, steps and guidance, different seeds); {setup.rounds} rounds of each, "
        "alternating, best round shown. Mean images per call is the worker's own count "
        "over every round; batch sizes are images per call x calls.",
        "",
        f"| model | images/s c=1 | images/s c={many} | ratio | images/call c=1 "
        f"| images/call c={many} | batch sizes c={many} |",
        "|---|---:|---:|---:|---:|---:|---|",
        *_batching_rows(batching),
        "",
        "### Memory",
        "",
        "RSS of a fresh `hearth worker` once its heartbeat lists its models (nothing run yet):",
        "",
        *_memory_lines(memory),
        "",
        "### Targets",
        "",
        *_targets(setup, overheads, batching),
        end,
    ]
    return "\n".join(lines) + "\n"
