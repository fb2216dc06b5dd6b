"""The OpenMP environment a worker runs its CPU inference threads with.

It must be in place before torch loads OpenMP (at ``import torch``), so the
worker command sets it first; the benchmark gives the raw model it compares
against the same one. Variables already set win.

- ``GOMP_SPINCOUNT`` (with ``short_spin``): after each parallel region the
  threads spin this many rounds before they sleep. libgomp's default (300,000)
  kept a core busy well after every embedding batch, while the worker's own
  Redis writes, Redis and the API were the ones that needed it (measured: p50
  at concurrency 1 and throughput at 32 both about 15% better with 10,000). A
  worker that holds only diffusion models keeps the default: a pipeline runs
  thousands of small operations with Python in between, and threads that fell
  asleep in those gaps made each image about 5% slower.
- ``OMP_PROC_BIND`` (with ``pin``): threads stay bound to their cores while the
  API and Redis run around them, for a worker that has the machine to itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

SPIN_COUNT = 10_000


def openmp_environment(
    pin: bool, short_spin: bool = True, environ: Mapping[str, str] = os.environ
) -> dict[str, str]:
    """The OpenMP variables to add to ``environ`` (those it lacks)."""
    wanted: dict[str, str] = {}
    if short_spin:
        wanted["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    if pin:
        wanted["OMP_PROC_BIND"] = "true"
    return {name: value for name, value in wanted.items() if name not in environ}
