"""The live workers, as their heartbeats in Redis describe them.

Read at most once per second per API process, so checking "does a live worker
hold this model?" costs no Redis round trip on the hot path. When the second
is up, the requests that ask meanwhile share one read rather than each making
its own: under load that was dozens of reads at once, each taking a connection.

Past its second, a list that still names a live holder of the model asked for
is served while a read in the background refreshes it, so no request waits for
that read (before, the first request of every second did: a Redis round trip
on its path). A holder counts as live while its heartbeat, as last read, is
younger than the worker TTL. A list naming no such holder is never trusted past
its second: the request waits for a fresh read rather than be refused on an
old one.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import cast

import orjson
from redis.asyncio import Redis

from workers.protocol import Keys

CACHE_S = 1.0


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    models: tuple[str, ...]
    device: str
    heartbeat_at: float

    def live(self, now: float, ttl_s: float) -> bool:
        """Whether its heartbeat, at ``now`` (time.time()), is younger than ``ttl_s``."""
        return now - self.heartbeat_at <= ttl_s


class Fleet:
    def __init__(self, redis: Redis, keys: Keys, ttl_s: float) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_s = ttl_s
        self._workers: list[WorkerInfo] = []
        self._read_at = float("-inf")
        self._reading: asyncio.Future[list[WorkerInfo]] | None = None

    async def live(self) -> list[WorkerInfo]:
        """Workers whose last heartbeat is younger than the TTL; stale ones are pruned."""
        if time.monotonic() - self._read_at < CACHE_S:
            return self._workers
        # Shielded: a request that goes away does not end the read the others wait on.
        return await asyncio.shield(self._refresh())

    async def stop(self) -> None:
        """End a read still under way, before the connections close."""
        reading = self._reading
        if reading is not None:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)

    def _refresh(self) -> asyncio.Future[list[WorkerInfo]]:
        """The read under way, started if there is none."""
        reading = self._reading
        if reading is None or reading.get_loop() is not asyncio.get_running_loop():
            self._reading = reading = asyncio.ensure_future(self._read())
            reading.add_done_callback(self._read_done)
        return reading

    def _read_done(self, reading: asyncio.Future[list[WorkerInfo]]) -> None:
        if self._reading is reading:
            self._reading = None
        if not reading.cancelled():
            reading.exception()  # retrieved: whoever waited has it; nobody left, no warning

    async def _read(self) -> list[WorkerInfo]:
        beats = cast(dict[bytes, bytes], await self.redis.hgetall(self.keys.workers()))
        now = time.time()
        live: list[WorkerInfo] = []
        stale: list[bytes] = []
        for name, raw in beats.items():
            beat = orjson.loads(raw)
            worker = WorkerInfo(
                id=name.decode(),
                models=tuple(beat.get("models", ())),
                device=str(beat.get("device", "")),
                heartbeat_at=float(beat["heartbeat_at"]),
            )
            if worker.live(now, self.ttl_s):
                live.append(worker)
            else:
                stale.append(name)
        if stale:
            await self.redis.hdel(self.keys.workers(), *stale)
        self._workers, self._read_at = live, time.monotonic()
        return live

    async def holders(self, model_id: str) -> list[str]:
        """The live workers holding ``model_id``; see the module's docstring for how
        old the list may be."""
        if time.monotonic() - self._read_at >= CACHE_S:
            now = time.time()
            held = [
                worker.id
                for worker in self._workers
                if model_id in worker.models and worker.live(now, self.ttl_s)
            ]
            if held:
                self._refresh()
                return held
        return [worker.id for worker in await self.live() if model_id in worker.models]
