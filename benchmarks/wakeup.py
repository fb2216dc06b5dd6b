"""How long one process takes to wake another on this machine.

Every request through Hearth hops between processes (client → API → Redis →
worker and back), and at low load each hop wakes a process that was idle. On
bare metal such a wake-up costs tens of microseconds; on some virtual machines
it costs a millisecond or more whenever the other core was idle, because the
hypervisor must first run that idle virtual CPU again. That cost lands on
Hearth's latency and not on a raw in-process model call, so the benchmarks
print it next to their results.

The probe sends one byte back and forth between this process and a child
process pinned to a core, either right after the previous round trip (back to
back) or after an idle pause, with the child on this process's core or on
another one.

Run: .venv/bin/python benchmarks/wakeup.py [--trips 300]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

PAUSE_S = 0.002  # the idle pause before a round trip, as between the hops of a lone request
TRIPS = 300

# The child: echo every byte back until the socket closes.
_ECHO = """
import os, socket, sys
os.sched_setaffinity(0, {int(sys.argv[2])})
peer = socket.socket(fileno=int(sys.argv[1]))
while data := peer.recv(1):
    peer.sendall(data)
"""


@dataclass(frozen=True)
class WakeUp:
    """Round-trip times of one placement and pause, in microseconds."""

    other_core: bool
    pause_s: float
    p50_us: float
    p90_us: float


def round_trips(core: int, peer_core: int, pause_s: float, trips: int) -> tuple[float, float]:
    """p50 and p90 (µs) of ``trips`` one-byte round trips to a child pinned to ``peer_core``."""
    mine, theirs = socket.socketpair()
    child = subprocess.Popen(
        [sys.executable, "-c", _ECHO, str(theirs.fileno()), str(peer_core)],
        pass_fds=(theirs.fileno(),),
    )
    theirs.close()
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        mine.sendall(b"x")  # the child is up once it answers
        mine.recv(1)
        times: list[float] = []
        for _ in range(trips):
            if pause_s:
                time.sleep(pause_s)
            started = time.perf_counter()
            mine.sendall(b"x")
            mine.recv(1)
            times.append(time.perf_counter() - started)
    finally:
        os.sched_setaffinity(0, before)
        mine.close()
        child.wait()
    p50, p90 = np.percentile(np.array(times) * 1e6, [50, 90])
    return float(p50), float(p90)


def probe(trips: int = TRIPS) -> list[WakeUp]:
    """Same core and (with two or more cores) another core, back to back and after a pause."""
    cores = sorted(os.sched_getaffinity(0))
    placements = [(cores[0], cores[0])] + ([(cores[0], cores[1])] if len(cores) > 1 else [])
    results: list[WakeUp] = []
    for core, peer_core in placements:
        for pause_s in (0.0, PAUSE_S):
            p50, p90 = round_trips(core, peer_core, pause_s, trips)
            results.append(WakeUp(core != peer_core, pause_s, p50, p90))
    return results


def summary(results: list[WakeUp]) -> str:
    """One line for a results file: the round trips after a pause, by placement."""
    paused = [result for result in results if result.pause_s]
    parts = [
        f"{'another core' if r.other_core else 'the same core'} "
        f"p50 {r.p50_us:.0f} µs, p90 {r.p90_us:.0f} µs"
        for r in paused
    ]
    return (
        f"one-byte round trip to a process left idle {PAUSE_S * 1000:g} ms: "
        + "; ".join(parts)
        + " (`benchmarks/wakeup.py`)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trips", type=int, default=TRIPS, help="round trips per measurement")
    args = parser.parse_args()
    print("| peer process on | idle before each trip | p50 µs | p90 µs |")
    print("|---|---:|---:|---:|")
    for result in probe(args.trips):
        where = "another core" if result.other_core else "the same core"
        pause = f"{result.pause_s * 1000:g} ms" if result.pause_s else "none"
        print(f"| {where} | {pause} | {result.p50_us:.0f} | {result.p90_us:.0f} |")


if __name__ == "__main__":
    main()
