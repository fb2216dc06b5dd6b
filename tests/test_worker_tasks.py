"""How the worker ends its background tasks (heartbeat, cancellation listener, claim holds)."""

from __future__ import annotations

import asyncio

from tests.support import run_on_own_thread
from workers.worker import cancel_and_wait


async def _beating() -> None:
    """A loop like the heartbeat's that carries on from the first cancellation it
    meets, as it does when redis-py turns one landing inside a read into a timeout
    the loop logs."""
    absorbed = False
    while True:
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            if absorbed:
                raise
            absorbed = True
            asyncio.current_task().uncancel()  # type: ignore[union-attr]


def test_a_task_that_carries_on_from_its_cancellation_is_cancelled_again() -> None:
    async def scenario() -> None:
        beating = asyncio.create_task(_beating())
        await asyncio.sleep(0.02)
        # Cancelled once and waited for, as the worker did: the task goes on.
        beating.cancel()
        done, _ = await asyncio.wait([beating], timeout=0.3)
        assert not done
        await asyncio.wait_for(cancel_and_wait([beating]), timeout=5)
        assert beating.cancelled()

    run_on_own_thread(scenario)


def test_every_task_ends_and_their_errors_are_retrieved() -> None:
    async def fails() -> None:
        raise RuntimeError("a background task that failed")

    async def waits() -> None:
        await asyncio.sleep(60)

    async def scenario() -> None:
        tasks = [asyncio.create_task(fails()), asyncio.create_task(waits())]
        await asyncio.sleep(0)
        await asyncio.wait_for(cancel_and_wait(tasks), timeout=5)
        assert all(task.done() for task in tasks)
        assert tasks[1].cancelled()

    run_on_own_thread(scenario)
