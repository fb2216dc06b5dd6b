"""The embeddings benchmark's results, and their Markdown section in RESULTS.md.

RESULTS.md holds one section per benchmark between its own markers, so each
benchmark rewrites its section and leaves the others as they are;
``marks``, ``write_section`` and ``machine`` serve every benchmark.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from rawmodel import RawResult

import hearth


def marks(name: str) -> tuple[str, str]:
    """The start and end markers around benchmark ``name``'s section."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


START_MARK, END_MARK = marks("embeddings")
THROUGHPUT_TARGET = 0.8  # Hearth at concurrency 32 / the raw model's best batched throughput
PEER_TARGET = 1.5  # Hearth at concurrency 32 / infinity-emb, requests per second
ADDED_P50_TARGET_MS = 3.0  # Hearth p50 at concurrency 1 minus the raw batch-1 p50
FOREIGN_CPU_LIMIT = 0.05  # more of the machine used by other processes makes a run unreliable
# Idle time before each raw call of the second latency timing: about what a
# worker waits between the requests of a lone client (the request's way there
# and back through HTTP and Redis).
IDLE_MS = 5.0
BEST_RAW_BATCHES = (32, 64)  # where this model's raw throughput peaks on a small CPU


@dataclass(frozen=True)
class Level:
    """One server measured at one concurrency and request shape."""

    concurrency: int
    inputs: int  # texts per request
    requests: int
    errors: int
    rps: float
    inputs_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    error_sample: str | None
    batch_sizes: dict[int, int]  # Hearth: texts per forward pass → how many passes
    # Hearth: ms of CPU per request by process (worker, api, redis, loadgen), and
    # the share of all cores busy during the level.
    cpu_ms: dict[str, float] = field(default_factory=dict)
    busy: float | None = None

    @property
    def cpu_bound_inputs_per_s(self) -> float | None:
        """The most texts per second the machine's cores could carry at this CPU
        cost per request, were they busy all the time."""
        total = sum(self.cpu_ms.values())
        return (os.cpu_count() or 1) * 1000 / total * self.inputs if total else None

    @property
    def mean_batch(self) -> float | None:
        """Mean texts per forward pass, or None when unknown."""
        passes = sum(self.batch_sizes.values())
        texts = sum(size * count for size, count in self.batch_sizes.items())
        return texts / passes if passes else None

    @property
    def rounded_batch(self) -> int | None:
        """The mean batch size as a whole number of texts (at least 1)."""
        mean = self.mean_batch
        return None if mean is None else max(1, round(mean))


def fastest(timings: list[RawResult], batch_size: int) -> RawResult | None:
    """The fastest of ``timings`` at ``batch_size``, if any."""
    matching = [r for r in timings if r.batch_size == batch_size]
    return max(matching, key=lambda r: r.texts_per_s, default=None)


@dataclass
class Raw:
    """Every raw-model timing of the run, in order, and its batch-1 latency:
    back to back, and with the model idle ``IDLE_MS`` before each call."""

    timings: list[RawResult] = field(default_factory=list)
    p50_ms: float = float("nan")
    idle_p50_ms: float = float("nan")
    # (Hearth ms, raw ms) of pairs at concurrency 1, one request and one call of the
    # same sentence, measured in turn (embeddings.latency_pairs)
    paired: list[tuple[float, float]] = field(default_factory=list)

    @property
    def paired_added_ms(self) -> float | None:
        """The median over pairs of Hearth's ms minus the raw call's; None without pairs."""
        if not self.paired:
            return None
        return statistics.median(hearth - raw for hearth, raw in self.paired)

    def table(self) -> list[RawResult]:
        """The fastest timing per batch size, by size."""
        sizes = sorted({r.batch_size for r in self.timings})
        return [r for size in sizes if (r := fastest(self.timings, size)) is not None]


@dataclass(frozen=True)
class Row:
    """One level: Hearth, the raw timings taken right after it, and the peer."""

    hearth: Level
    peer: Level | None
    near: list[RawResult]  # the raw model, timed next to this level

    @property
    def raw_at_batch(self) -> RawResult | None:
        batch = self.hearth.rounded_batch
        return None if batch is None else fastest(self.near, batch)

    @property
    def raw_best(self) -> RawResult:
        return max(self.near, key=lambda r: r.texts_per_s)

    @property
    def vs_raw_at_batch(self) -> float | None:
        at = self.raw_at_batch
        return self.hearth.inputs_per_s / at.texts_per_s if at else None

    @property
    def vs_raw_best(self) -> float:
        return self.hearth.inputs_per_s / self.raw_best.texts_per_s

    @property
    def vs_peer(self) -> float | None:
        if self.peer is None or not self.peer.rps:
            return None
        return self.hearth.rps / self.peer.rps

    def summary(self, raw: Raw) -> str:
        peer = f", infinity {self.peer.rps:.1f} req/s" if self.peer else ""
        return (
            f"{self.hearth.inputs} input(s) x concurrency {self.hearth.concurrency}: Hearth "
            f"{self.hearth.rps:.1f} req/s ({self.hearth.inputs_per_s:.0f} inputs/s, p50 "
            f"{self.hearth.p50_ms:.1f} ms){peer}; raw best {self.raw_best.texts_per_s:.0f} texts/s"
        )


def machine(torch_threads: int) -> str:
    """CPU model, logical cores, RAM (from /proc where available) and torch threads.

    The CPU's family, model and widest vector instructions are named too: cloud
    machines that report the same model name (say "AMD EPYC") differ threefold
    in what they compute per core."""
    cpu, ram_gib = platform.processor() or "unknown CPU", math.nan
    try:
        info = dict(
            (key.strip(), value.strip())
            for key, _, value in (
                line.partition(":") for line in Path("/proc/cpuinfo").read_text().splitlines()
            )
            if value
        )
        flags = set(info.get("flags", "").split())
        vector = next((name for name in ("avx512f", "avx2", "avx") if name in flags), "no AVX")
        cpu = (
            f"{info['model name']} (family {info.get('cpu family', '?')}, "
            f"model {info.get('model', '?')}, {vector.upper()})"
        )
        meminfo = Path("/proc/meminfo").read_text().split()
        ram_gib = int(meminfo[meminfo.index("MemTotal:") + 1]) / 1024**2
    except (OSError, KeyError, ValueError):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {ram_gib:.1f} GiB RAM, torch threads {torch_threads}"


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _row(row: Row) -> str:
    hearth, peer = row.hearth, row.peer
    at = row.raw_at_batch
    cells = [
        str(hearth.concurrency),
        f"{hearth.rps:.1f}",
        f"{hearth.inputs_per_s:.0f}",
        _fmt(hearth.p50_ms),
        _fmt(hearth.p90_ms),
        _fmt(hearth.p99_ms),
        f"{hearth.errors}/{hearth.requests}",
        _fmt(hearth.mean_batch),
        f"{at.texts_per_s:.0f}" if at else "n/a",
        _fmt(row.vs_raw_at_batch, 2),
        f"{row.raw_best.texts_per_s:.0f} (b{row.raw_best.batch_size})",
        _fmt(row.vs_raw_best, 2),
    ]
    if peer is not None:
        cells += [
            f"{peer.rps:.1f}",
            f"{peer.inputs_per_s:.0f}",
            _fmt(peer.p50_ms),
            _fmt(peer.p90_ms),
            _fmt(peer.p99_ms),
            f"{peer.errors}/{peer.requests}",
            _fmt(row.vs_peer, 2),
        ]
    else:
        cells += ["n/a"] * 7
    return f"| {' | '.join(cells)} |"


CPU_PARTS = (("worker", "worker"), ("api", "API"), ("redis", "Redis"), ("loadgen", "load gen."))


def _cpu_lines(rows: list[Row], raw: Raw, torch_threads: int) -> list[str]:
    """Where Hearth's CPU goes per request, and what that allows at most."""
    measured = [row for row in rows if row.hearth.cpu_ms]
    if not measured:
        return []
    best = max(raw.table(), key=lambda r: r.texts_per_s)
    table = []
    for row in measured:
        level, bound = row.hearth, row.hearth.cpu_bound_inputs_per_s
        cells = [
            str(level.inputs),
            str(level.concurrency),
            *(_fmt(level.cpu_ms.get(part), 2) for part, _ in CPU_PARTS),
            _fmt(sum(level.cpu_ms.values()), 2),
            f"{level.busy:.0%}" if level.busy is not None else "n/a",
            _fmt(bound, 0),
            _fmt(bound / row.raw_best.texts_per_s if bound else None, 2),
            _fmt(row.vs_raw_best, 2),
        ]
        table.append("| " + " | ".join(cells) + " |")
    return [
        "",
        "### Where Hearth's CPU goes",
        "",
        "Milliseconds of CPU per request, each process over the level's whole run (warmup"
        " included). Busy: the share of all cores in use, by anyone. CPU bound: the texts per"
        " second the cores could carry at this cost per request were they busy all the time;"
        " divided by the raw best next to the level, it is the most Hearth / raw best could be"
        " at this cost, whatever the scheduling. For scale: the raw model at its best batch"
        f" ({best.batch_size}) holds its {torch_threads} thread(s) for"
        f" {torch_threads * 1000 / best.texts_per_s:.2f} core-ms per text.",
        "",
        "| texts per request | conc. | "
        + " | ".join(name for _, name in CPU_PARTS)
        + " | total | busy | CPU bound inputs/s | bound / raw best | Hearth / raw best |",
        "|" + "---:|" * (len(CPU_PARTS) + 7),
        *table,
    ]


def _verdict(met: bool) -> str:
    return "**met**" if met else "**NOT met**"


def _paired_lines(raw: Raw) -> list[str]:
    if not raw.paired:
        return []
    hearth_ms, raw_ms = zip(*raw.paired, strict=True)
    added = [hearth - raw_call for hearth, raw_call in raw.paired]
    low, _, high = statistics.quantiles(added, n=4)
    return [
        "",
        f"Concurrency 1 against the raw call, request by request: after the levels, "
        f"{len(raw.paired)} pairs of one Hearth request and one raw batch-1 call of the same "
        "sentence. Each measured call comes right after an unmeasured one of its own kind "
        "(raw, raw, Hearth, Hearth; the next pair Hearth first), so both sides run back to "
        "back as they do alone, and the two measured calls of a pair lie milliseconds apart, "
        "sharing the machine's speed of that moment (it drifts by tens of percent from one "
        f"second to the next, more than the milliseconds measured). p50: Hearth "
        f"{statistics.median(hearth_ms):.2f} ms, raw {statistics.median(raw_ms):.2f} ms; "
        f"Hearth - raw per pair: median {raw.paired_added_ms:.2f} ms (quartiles "
        f"{low:.2f} to {high:.2f}).",
    ]


def _targets(rows: list[Row], raw: Raw, foreign: float) -> list[str]:
    caveat = (
        f" (unreliable: other processes used {foreign:.0%} of the CPU during the run)"
        if foreign > FOREIGN_CPU_LIMIT
        else ""
    )
    singles = {row.hearth.concurrency: row for row in rows if row.hearth.inputs == 1}
    lines: list[str] = []
    if 32 in singles:
        row = singles[32]
        best = row.raw_best
        lines.append(
            f"- One sentence per request, concurrency 32: Hearth {row.hearth.rps:.1f} req/s vs "
            f"the raw model's best batched throughput timed next to it ({best.texts_per_s:.1f} "
            f"texts/s at batch {best.batch_size}): {row.vs_raw_best:.2f}x (target ≥ "
            f"{THROUGHPUT_TARGET}): {_verdict(row.vs_raw_best >= THROUGHPUT_TARGET)}{caveat}."
        )
        if row.peer is not None and row.vs_peer is not None:
            lines.append(
                f"- Same level vs infinity-emb ({row.peer.rps:.1f} req/s): {row.vs_peer:.2f}x "
                f"(target ≥ {PEER_TARGET}): {_verdict(row.vs_peer >= PEER_TARGET)}{caveat}."
            )
        else:
            lines.append("- Target vs infinity-emb: not measured (run without it).")
    else:
        lines.append("- Throughput targets: not measured (concurrency 32 was not run).")
    if 1 in singles:
        p50 = singles[1].hearth.p50_ms
        added = p50 - raw.p50_ms
        level = (
            f"the level above against the faster of the two raw measurements around the run: "
            f"{p50:.2f} - {raw.p50_ms:.2f} = {added:.2f} ms"
        )
        # Judged by the pairs where there are some; the level's own figure stays beside them.
        paired = raw.paired_added_ms
        judged, how, beside = (
            (added, level, "")
            if paired is None
            else (
                paired,
                f"the median of {len(raw.paired)} pairs measured in turn: {paired:.2f} ms",
                f"; {level}",
            )
        )
        lines.append(
            f"- One sentence, concurrency 1: Hearth p50 - raw batch-1 p50, {how} (target ≤ "
            f"{ADDED_P50_TARGET_MS:g} ms): {_verdict(judged <= ADDED_P50_TARGET_MS)}"
            f"{caveat}{beside}."
        )
    else:
        lines.append("- Latency target: not measured (concurrency 1 was not run).")
    return lines


def render(
    command: str,
    model_id: str,
    torch_threads: int,
    foreign: float,
    rows: list[Row],
    raw: Raw,
    peer_versions: str,
    wake_up: str,
) -> str:
    """The Embeddings section as Markdown, markers included.

    ``foreign`` is the share of all cores other processes used during the run;
    ``wake_up`` is ``wakeup.summary()`` of a probe taken with every server stopped.
    """
    versions = (
        f"Python {platform.python_version()}, torch {metadata.version('torch')}, "
        f"transformers {metadata.version('transformers')}, hearth {hearth.__version__}; "
        f"{peer_versions}"
    )
    lines = [
        START_MARK,
        "## Embeddings",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {machine(torch_threads)}",
        f"- Wake-up: {wake_up}",
        f"- Versions: {versions}",
        f"- Model: {model_id} (the packaged folder, served by every contender); requests of one"
        " sentence (11-14 words) or a list of 16, from 64 distinct sentences cycled",
        "- Contenders: Hearth as `hearth serve` runs it (API + Redis + one worker, threads bound"
        " to the cores); the raw model in a process of its own with the worker's code and"
        " settings; infinity-emb in its own virtual environment (torch engine, float32, batch"
        " size 32)",
        f"- CPU used by other processes during the run (share of all cores): {foreign:.0%};"
        f" above {FOREIGN_CPU_LIMIT:.0%}, the numbers below are disturbed",
        "",
        "Closed loop from one load-generator process (httpclient.py) on the same machine, the same"
        " requests for every contender. A level lasts `--duration`, or three rounds of every"
        " client where more texts are in flight than that allows. Errors are"
        " failed/completed requests; mean batch is"
        " texts per forward pass in Hearth's worker. The raw model is timed right after each"
        " Hearth level, at the worker's mean batch and at its best batch sizes: Hearth / raw"
        " divides Hearth's inputs/s by those timings; Hearth / inf divides requests/s.",
    ]
    for inputs in sorted({row.hearth.inputs for row in rows}):
        shape = "one sentence" if inputs == 1 else f"{inputs} sentences"
        lines += [
            "",
            f"### {shape.capitalize()} per request",
            "",
            "| conc. | Hearth req/s | inputs/s | p50 ms | p90 ms | p99 ms | errors | mean batch"
            " | raw at batch | Hearth / raw | raw best | Hearth / raw best | infinity req/s"
            " | inputs/s | p50 ms | p90 ms | p99 ms | errors | Hearth / inf |",
            "|" + "---:|" * 19,
            *(_row(row) for row in rows if row.hearth.inputs == inputs),
        ]
    lines += _cpu_lines(rows, raw, torch_threads)
    lines += [
        "",
        "### Raw model, in its own process (fastest timing per batch size)",
        "",
        "| batch size | texts/s | ms per call |",
        "|---:|---:|---:|",
        *(f"| {r.batch_size} | {r.texts_per_s:.1f} | {r.ms_per_call:.2f} |" for r in raw.table()),
        "",
        f"Raw batch-1 latency p50: {raw.p50_ms:.2f} ms back to back (the baseline of the"
        f" latency target); {raw.idle_p50_ms:.2f} ms when the model sits idle {IDLE_MS:g} ms"
        " before each call, as a worker does between the requests of a lone client. The"
        " difference is what a call after idle costs more on this machine; Hearth's p50 at"
        " concurrency 1 pays it too.",
        *_paired_lines(raw),
        "",
        "### Targets",
        "",
        *_targets(rows, raw, foreign),
    ]
    samples = [
        f"- {contender} at {level.inputs} input(s), concurrency {level.concurrency}:"
        f" `{level.error_sample}`"
        for row in rows
        for contender, level in (("Hearth", row.hearth), ("infinity-emb", row.peer))
        if level is not None and level.error_sample
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
