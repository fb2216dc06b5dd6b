"""Hearth against the raw model, call by call: the pairs both benchmarks judge by.

A pair is one call through Hearth and one raw call of the same input, made a
moment apart, so that both share the machine's speed of that moment, which on
a shared machine drifts by tens of percent from one second to the next. Each
measured call comes right after an unmeasured one of its own kind (raw, raw,
Hearth, Hearth; the next pair Hearth first), so that each side runs as it does
back to back on its own: a call right after the other side's starts on caches
that side filled, and after a pipeline call, while its OpenMP threads still
spin.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


async def primed_pairs(
    inputs: Iterable[int],
    hearth: Callable[[int], Awaitable[T]],
    raw: Callable[[int], float],
) -> list[tuple[T, float]]:
    """(Hearth's measured call, raw ms) for each input, in order: ``hearth`` and
    ``raw`` each run twice per input, the second call measured."""
    pairs: list[tuple[T, float]] = []
    for index, item in enumerate(inputs):
        if index % 2:
            await hearth(item)
            through_hearth = await hearth(item)
            raw(item)
            raw_ms = raw(item)
        else:
            raw(item)
            raw_ms = raw(item)
            await hearth(item)
            through_hearth = await hearth(item)
        pairs.append((through_hearth, raw_ms))
    return pairs
