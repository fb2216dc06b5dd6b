"""Work done a step at a time: a generator that yields between its steps and
returns its result.

An embedding batch is one forward pass after another. Run on a worker's event
loop (``step_through``), it yields after each pass, so that the loop's
heartbeats and leases go on while a long batch runs (see
``workers.worker.Worker._run_on_loop``); elsewhere it runs at once
(``complete``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator
from typing import TypeVar

T = TypeVar("T")

LONG_S = 0.05  # steps running this long turn the loop LONG_TURNS times between two
LONG_TURNS = 4  # what a Redis command through a pooled connection takes

Steps = Generator[None, None, T]


def complete(steps: Steps[T]) -> T:
    """Run ``steps`` through to its result, without pausing."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


async def step_through(steps: Steps[T]) -> T:
    """Run ``steps`` on the event loop's thread, letting the loop turn before
    each step: what it has to send goes out first, and what came in meanwhile
    is handled between steps.

    Once the steps have run for ``LONG_S``, the loop turns ``LONG_TURNS`` times
    between two of them. A heartbeat's write and its reply take four turns, one
    per pass when the loop turned once: beats came 6-7 passes apart in a long
    batch, close to the heartbeat bound under load. A short batch (a lone
    request's) is not kept from its store by turns it has no use for.
    """
    started = time.monotonic()
    try:
        while True:
            await asyncio.sleep(0)
            if time.monotonic() - started >= LONG_S:
                for _turn in range(LONG_TURNS - 1):
                    await asyncio.sleep(0)
            try:
                next(steps)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
    finally:
        steps.close()
