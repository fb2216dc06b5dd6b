"""How the worker ends its background tasks (heartbeat, cancellation listener, claim
holds), and how a batch on its event loop lets them run."""

from __future__ import annotations

import asyncio
import itertools
import time

from models.stepwise import LONG_S, LONG_TURNS, Steps, step_through
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


def test_a_long_batch_lets_the_loop_turn_several_times_between_its_steps() -> None:
    def batch(steps: int, step_s: float) -> Steps[int]:
        for _ in range(steps):
            time.sleep(step_s)  # a forward pass, holding the loop
            yield
        return steps

    async def turns_per_step(steps: int, step_s: float) -> list[int]:
        """How far a task that only awaits the loop's turns gets during each step."""
        turns = 0

        async def counting() -> None:
            nonlocal turns
            while True:
                await asyncio.sleep(0)
                turns += 1

        counter = asyncio.create_task(counting())
        seen: list[int] = []

        def stepped() -> Steps[int]:
            inner = batch(steps, step_s)
            while True:
                seen.append(turns)
                try:
                    next(inner)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
                yield

        assert await step_through(stepped()) == steps
        await cancel_and_wait([counter])
        return [later - earlier for earlier, later in itertools.pairwise(seen)]

    # A long batch: once LONG_S has passed, LONG_TURNS turns between two passes, so a
    # heartbeat's write and reply (four turns) get through within one pass.
    long_gaps = run_on_own_thread(lambda: turns_per_step(8, LONG_S / 2))
    assert long_gaps[0] == 1  # at first, one turn
    assert long_gaps[-1] == LONG_TURNS
    # A lone request's batch never waits for turns it has no use for.
    assert run_on_own_thread(lambda: turns_per_step(3, 0.001)) == [1, 1, 1]
