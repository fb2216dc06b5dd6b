"""The embeddings benchmark's results, and their Markdown section in RESULTS.md.

RESULTS.md holds one section per benchmark between its own markers, so each
benchmark rewrites its section and leaves the others as they are;
``marks``, ``write_section`` and ``machine`` serve every benchmark.
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import hearth


def marks(name: str) -> tuple[str, str]:
    """The start and end markers around benchmark ``name``'s section."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


START_MARK, END_MARK = marks("embeddings")
THROUGHPUT_TARGET = 0.8  # Hearth at concurrency 32 / the raw model's best batched throughput
ADDED_P50_TARGET_MS = 5.0  # Hearth p50 at concurrency 1 minus the raw batch-1 p50
FOREIGN_CPU_LIMIT = 0.05  # more of the machine used by other processes makes a run unreliable


@dataclass(frozen=True)
class Level:
    """One concurrency level measured through Hearth."""

    concurrency: int
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    error_sample: str | None
    batch_sizes: dict[int, int]  # texts per forward pass → how many passes

    @property
    def mean_batch(self) -> float | None:
        """Mean texts per forward pass, or None when the worker ran none."""
        passes = sum(self.batch_sizes.values())
        texts = sum(size * count for size, count in self.batch_sizes.items())
        return texts / passes if passes else None

    @property
    def rounded_batch(self) -> int | None:
        """The mean batch size as a whole number of texts (at least 1)."""
        mean = self.mean_batch
        return None if mean is None else max(1, round(mean))


@dataclass(frozen=True)
class RawResult:
    """The model called in-process with one fixed batch size."""

    batch_size: int
    texts_per_s: float
    ms_per_call: float


def machine(torch_threads: int) -> str:
    """CPU model, logical cores, RAM (from /proc where available) and torch threads."""
    cpu, ram_gib = platform.processor() or "unknown CPU", math.nan
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
        meminfo = Path("/proc/meminfo").read_text().split()
        ram_gib = int(meminfo[meminfo.index("MemTotal:") + 1]) / 1024**2
    except (OSError, StopIteration, ValueError):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {ram_gib:.1f} GiB RAM, torch threads {torch_threads}"


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _level_row(level: Level, raw: dict[int, RawResult]) -> str:
    batch = level.rounded_batch
    at_batch = raw.get(batch) if batch is not None else None
    ratio = level.rps / at_batch.texts_per_s if at_batch else None
    cells = [
        str(level.concurrency),
        f"{level.rps:.1f}",
        _fmt(level.p50_ms),
        _fmt(level.p90_ms),
        _fmt(level.p99_ms),
        f"{level.errors}/{level.requests}",
        _fmt(level.mean_batch),
        _fmt(ratio, 2),
    ]
    return f"| {' | '.join(cells)} |"


def _targets(
    levels: list[Level], raw: dict[int, RawResult], raw_p50_ms: float, foreign: dict[str, float]
) -> list[str]:
    disturbed = max(foreign.values(), default=0.0)
    caveat = (
        f" (unreliable: other processes used up to {disturbed:.0%} of the CPU during the run)"
        if disturbed > FOREIGN_CPU_LIMIT
        else ""
    )
    by_concurrency = {level.concurrency: level for level in levels}
    best = max(raw.values(), key=lambda r: r.texts_per_s)
    lines: list[str] = []
    if 32 in by_concurrency:
        ratio = by_concurrency[32].rps / best.texts_per_s
        verdict = "met" if ratio >= THROUGHPUT_TARGET else "NOT met"
        lines.append(
            f"- Throughput at concurrency 32 ({by_concurrency[32].rps:.1f} req/s) vs the raw "
            f"model's best batched throughput ({best.texts_per_s:.1f} texts/s at batch "
            f"{best.batch_size}): ratio {ratio:.2f} (target ≥ {THROUGHPUT_TARGET}): "
            f"**{verdict}**{caveat}."
        )
    else:
        lines.append("- Throughput target: not measured (concurrency 32 was not run).")
    if 1 in by_concurrency:
        hearth_p50 = by_concurrency[1].p50_ms
        added = hearth_p50 - raw_p50_ms
        verdict = "met" if added <= ADDED_P50_TARGET_MS else "NOT met"
        lines.append(
            f"- Added p50 at concurrency 1: Hearth p50 - raw batch-1 p50 = {hearth_p50:.2f} - "
            f"{raw_p50_ms:.2f} = {added:.2f} ms (target ≤ {ADDED_P50_TARGET_MS:g} ms): "
            f"**{verdict}**{caveat}."
        )
    else:
        lines.append("- Latency target: not measured (concurrency 1 was not run).")
    return lines


def render(
    command: str,
    model_id: str,
    torch_threads: int,
    foreign: dict[str, float],
    levels: list[Level],
    raw: dict[int, RawResult],
    raw_p50_ms: float,
) -> str:
    """The Embeddings section as Markdown, markers included.

    ``foreign`` is, per phase, the share of all cores that other processes used.
    """
    versions = (
        f"Python {platform.python_version()}, torch {metadata.version('torch')}, "
        f"transformers {metadata.version('transformers')}, hearth {hearth.__version__}"
    )
    lines = [
        START_MARK,
        "## Embeddings",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {machine(torch_threads)}",
        f"- Versions: {versions}",
        f"- Model: {model_id}; one sentence of 11-14 words per request, 64 distinct ones cycled",
        "- CPU used by other processes (share of all cores): "
        + ", ".join(f"{phase} {share:.0%}" for phase, share in foreign.items())
        + f"; above {FOREIGN_CPU_LIMIT:.0%}, the numbers below are disturbed",
        "",
        "### Through Hearth",
        "",
        "Closed loop from one load-generator process on the same machine; errors are"
        " failed/completed requests; mean batch is texts per forward pass in the worker;"
        " Hearth / raw is req/s over the raw model's texts/s at that mean batch size.",
        "",
        "| concurrency | req/s | p50 ms | p90 ms | p99 ms | errors | mean batch | Hearth / raw |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(_level_row(level, raw) for level in levels),
        "",
        "### Raw model, in-process",
        "",
        "| batch size | texts/s | ms per call |",
        "|---:|---:|---:|",
        *(f"| {r.batch_size} | {r.texts_per_s:.1f} | {r.ms_per_call:.2f} |" for r in raw.values()),
        "",
        f"Raw batch-1 latency p50: {raw_p50_ms:.2f} ms.",
        "",
        "### Targets",
        "",
        *_targets(levels, raw, raw_p50_ms, foreign),
    ]
    samples = [
        f"- concurrency {lv.concurrency}: `{lv.error_sample}`" for lv in levels if lv.error_sample
    ]
    if samples:
        lines += ["", "First error seen per level:", "", *samples]
    lines.append(END_MARK)
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str, name: str = "embeddings") -> None:
    """Put ``section`` in ``path`` in place of benchmark ``name``'s old one, keeping the rest.

    ``section`` carries the markers of ``name`` (see ``marks``)."""
    start_mark, end_mark = marks(name)
    if not path.exists():
        path.write_text(f"# Benchmarks\n\n{section}")
        return
    text = path.read_text()
    start, end = text.find(start_mark), text.find(end_mark)
    if start != -1 and end > start:
        text = text[:start] + section + text[end + len(end_mark) :].removeprefix("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
