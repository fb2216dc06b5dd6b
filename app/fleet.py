"""The live workers, as their heartbeats in Redis describe them.

Read at most once per second per API process, so checking "does a live worker
hold this model?" costs no Redis round trip on the hot path. When the second
is up, the requests that ask meanwhile share one read rather than each making
its own: under load that was dozens of reads at once, each taking a connection.
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
        reading = self._reading
        if reading is None or reading.get_loop() is not asyncio.get_running_loop():
            self._reading = reading = asyncio.ensure_future(self._read())
            reading.add_done_callback(self._read_done)
        # Shielded: a request that goes away does not end the read the others wait on.
        return await asyncio.shield(reading)

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
            if now - float(beat["heartbeat_at"]) > self.ttl_s:
                stale.append(name)
            else:
                live.append(
                    WorkerInfo(
                        id=name.decode(),
                        models=tuple(beat.get("models", ())),
                        device=str(beat.get("device", "")),
                        heartbeat_at=float(beat["heartbeat_at"]),
                    )
                )
        if stale:
            await self.redis.hdel(self.keys.workers(), *stale)
        self._workers, self._read_at = live, time.monotonic()
        return live

    async def holders(self, model_id: str) -> list[str]:
        return [worker.id for worker in await self.live() if model_id in worker.models]
