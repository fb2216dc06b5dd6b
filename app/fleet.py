"""The live workers, as their heartbeats in Redis describe them.

Read at most once per second per API process, so checking "does a live worker
hold this model?" costs no Redis round trip on the hot path.
"""

from __future__ import annotations

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

    async def live(self) -> list[WorkerInfo]:
        """Workers whose last heartbeat is younger than the TTL; stale ones are pruned."""
        if time.monotonic() - self._read_at < CACHE_S:
            return self._workers
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
