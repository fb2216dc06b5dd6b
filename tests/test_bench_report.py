"""The benchmarks' Markdown tables: the embeddings section (benchmarks/report.py),
where every row has a cell per column and every contender shows the same
measures, and the images section's pairs by order (benchmarks/images_report.py)."""

from __future__ import annotations

import pytest
from imageload import PHASES
from images_report import Batching, Memory, Overhead, Round, Setup
from images_report import render as render_images
from pairs import primed_pairs
from rawmodel import RawResult
from report import Level, Raw, Row, render

from tests.support import run_on_own_thread


def level(concurrency: int, rps: float, p50: float, p90: float, p99: float) -> Level:
    return Level(
        concurrency=concurrency,
        inputs=1,
        requests=100,
        errors=0,
        rps=rps,
        inputs_per_s=rps,
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        error_sample=None,
        batch_sizes={1: 100},
    )


def images_section(overhead: Overhead) -> str:
    """The images section of one overhead figure, with made-up batching and memory."""
    rounds = len(overhead.raw)
    setup = Setup("bench", 2, 64, 20, 4, {64: 4}, rounds, 1, {"overhead": 0.0}, "n/a")
    batching = Batching("demo-dit", 8, [10.0], [20.0], {1: 8}, {8: 1})
    memory = Memory({"demo-dit": 400.0, "both": 410.0}, 5, True, 300.0, {"demo-dit": 600.0})
    return render_images(setup, [overhead], [batching], memory)


def table(section: str, title: str) -> list[list[str]]:
    """The cells of the Markdown table after the line that starts with ``title`` (and
    a blank line), header first, rule left out."""
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title)) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return [rows[0], *rows[2:]]


def test_every_row_fills_every_column_and_the_peer_shows_its_percentiles() -> None:
    near = [RawResult(1, 80.0, 12.5), RawResult(32, 390.0, 82.0)]
    rows = [
        Row(level(1, 70.0, 13.9, 17.0, 21.7), level(1, 45.6, 21.6, 24.4, 28.2), near),
        Row(level(8, 250.0, 30.8, 36.6, 49.7), None, near),
    ]
    section = render("bench", "model", 2, 0.0, rows, Raw(timings=near), "peer 1.0", "n/a")

    header, with_peer, without_peer = table(section, "### One sentence per request")
    assert len(with_peer) == len(header) and len(without_peer) == len(header)
    peer = dict(zip(header[12:], with_peer[12:], strict=True))
    assert peer["infinity req/s"] == "45.6"
    assert (peer["inputs/s"], peer["p50 ms"], peer["p90 ms"], peer["p99 ms"]) == (
        "46",
        "21.6",
        "24.4",
        "28.2",
    )
    assert set(without_peer[12:]) == {"n/a"}


def test_concurrency_one_is_judged_by_the_median_of_its_pairs_differences() -> None:
    near = [RawResult(1, 80.0, 12.5)]
    rows = [Row(level(1, 70.0, 14.0, 17.0, 21.7), None, near)]
    # Differences 1, 2, 3, 4 and 9 ms: median 3; the p50s alone would give 16 - 12 = 4.
    pairs = [(13.0, 12.0), (20.0, 18.0), (14.0, 11.0), (16.0, 12.0), (19.0, 10.0)]
    raw = Raw(timings=near, p50_ms=10.0, paired=pairs)
    section = render("bench", "model", 2, 0.0, rows, raw, "peer 1.0", "n/a")

    assert "5 pairs of one Hearth request and one raw batch-1 call" in section
    assert "p50: Hearth 16.00 ms, raw 12.00 ms" in section
    assert "median 3.00 ms (quartiles 1.50 to 6.50)" in section
    verdict = next(line for line in section.splitlines() if "concurrency 1:" in line)
    assert "the median of 5 pairs measured in turn: 3.00 ms" in verdict
    assert "**met**" in verdict and "14.00 - 10.00 = 4.00 ms" in verdict

    worse = [(hearth + 0.5, raw_ms) for hearth, raw_ms in pairs]
    section = render("bench", "model", 2, 0.0, rows, Raw(near, 10.0, paired=worse), "p", "n/a")
    verdict = next(line for line in section.splitlines() if "concurrency 1:" in line)
    assert "3.50 ms (target ≤ 3 ms): **NOT met**" in verdict


def test_image_pairs_split_by_which_side_went_first() -> None:
    # Two rounds of four pairs; alternating() makes pairs 0 and 2 raw first.
    raw = [Round((50.0, 53.0, 50.0, 53.0)), Round((52.0, 55.0, 52.0, 55.0))]
    hearth = [Round((56.0, 51.0, 56.0, 51.0)), Round((58.0, 53.0, 58.0, 53.0))]
    overhead = Overhead("demo-dit", 64, raw, hearth, [0.0] * len(PHASES))

    raw_first, hearth_first = overhead.by_order()
    assert raw_first == [(50.0, 56.0), (50.0, 56.0), (52.0, 58.0), (52.0, 58.0)]
    assert hearth_first == [(53.0, 51.0), (53.0, 51.0), (55.0, 53.0), (55.0, 53.0)]
    # Per image: +12%, -3.8%, +12%, -3.8%, +11.5%, -3.6%, +11.5%, -3.6%: the median
    # lies between -3.6% (55 then 53) and +11.5% (52 then 58).
    assert overhead.percent == pytest.approx(((58.0 / 52.0 - 1) + (53.0 / 55.0 - 1)) * 50)

    section = images_section(overhead)
    header, row = table(section, "The same pairs by which side went first")
    assert len(row) == len(header)
    assert row[2:] == ["51.0", "57.0", "+6.0", "52.0", "54.0", "-2.0"]


def test_primed_pairs_measure_each_side_right_after_one_of_its_own_kind() -> None:
    calls: list[str] = []

    async def hearth(item: int) -> str:
        calls.append(f"h{item}")
        return f"h{item}#{calls.count(f'h{item}')}"

    def raw(item: int) -> float:
        calls.append(f"r{item}")
        return item + calls.count(f"r{item}") / 10

    pairs = run_on_own_thread(lambda: primed_pairs([7, 8, 9], hearth, raw))

    assert calls == ["r7", "r7", "h7", "h7", "h8", "h8", "r8", "r8", "r9", "r9", "h9", "h9"]
    # The second call of each side is the one kept.
    assert pairs == [("h7#2", 7.2), ("h8#2", 8.2), ("h9#2", 9.2)]


@pytest.mark.parametrize(("hearth_ms", "verdict"), [(102.5, "**met**"), (103.5, "**NOT met**")])
def test_the_images_overhead_is_judged_against_3_percent(hearth_ms: float, verdict: str) -> None:
    raw = [Round((100.0,) * 4)]
    hearth = [Round((hearth_ms,) * 4)]
    overhead = Overhead("demo-dit", 64, raw, hearth, [0.0] * len(PHASES))
    section = images_section(overhead)
    line = next(line for line in section.splitlines() if line.startswith("- Overhead"))
    assert f"(target ≤ 3%): {verdict}" in line
