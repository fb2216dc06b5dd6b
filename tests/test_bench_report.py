"""The embeddings benchmark's Markdown tables (benchmarks/report.py): every row has
a cell per column, and every contender shows the same measures."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from rawmodel import RawResult
from report import Level, Raw, Row, render


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


def table(section: str, title: str) -> list[list[str]]:
    """The cells of the Markdown table under ``title``, header first, rule left out."""
    lines = section.splitlines()
    start = lines.index(title) + 2
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
