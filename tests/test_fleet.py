"""The API's view of the live workers, read from their heartbeats in Redis."""

from __future__ import annotations

import asyncio
import time

import orjson
import redis
from redis.asyncio import Redis

from app.fleet import Fleet
from hearth.embedded_redis import EmbeddedRedis
from tests.support import run_on_own_thread
from workers.protocol import Keys


def hgetall_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats").get("cmdstat_hgetall", {})
    return int(stats.get("calls", 0)) if isinstance(stats, dict) else 0


def beat(models: list[str], age_s: float) -> bytes:
    return orjson.dumps({"models": models, "device": "cpu", "heartbeat_at": time.time() - age_s})


def test_live_workers_are_those_with_a_fresh_heartbeat_and_stale_ones_are_pruned(
    redis_url: str, redis_client: redis.Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    redis_client.hset(
        keys.workers(),
        mapping={"fresh": beat(["a", "b"], 0), "stale": beat(["a"], 60)},
    )

    async def main() -> tuple[list[str], list[str]]:
        client = Redis.from_url(redis_url)
        try:
            fleet = Fleet(client, keys, ttl_s=10)
            return await fleet.holders("a"), await fleet.holders("c")
        finally:
            await client.aclose()

    holding_a, holding_c = run_on_own_thread(main)
    assert holding_a == ["fresh"]
    assert holding_c == []
    assert redis_client.hkeys(keys.workers()) == [b"fresh"]


def test_requests_asking_at_once_share_one_read_and_a_leaving_one_ends_none(
    private_redis: EmbeddedRedis,
) -> None:
    # Reads are counted by the server: a private one, which no other test reads from.
    server = private_redis
    counter = redis.Redis.from_url(server.url)
    keys = Keys("fleet")
    counter.hset(keys.workers(), mapping={"w1": beat(["a"], 0)})

    async def main() -> tuple[list[list[str]], int, int]:
        client = Redis.from_url(server.url)
        try:
            fleet = Fleet(client, keys, ttl_s=10)
            before = hgetall_calls(counter)
            leaving = asyncio.ensure_future(fleet.holders("a"))
            asking = [asyncio.ensure_future(fleet.holders("a")) for _ in range(40)]
            await asyncio.sleep(0)
            leaving.cancel()
            answers = await asyncio.gather(*asking)
            first = hgetall_calls(counter) - before
            # Within the cache's second: no read at all.
            await fleet.holders("a")
            cached = hgetall_calls(counter) - before
            return answers, first, cached
        finally:
            await client.aclose()

    try:
        answers, reads, cached_reads = run_on_own_thread(main)
    finally:
        counter.close()
    assert answers == [["w1"]] * 40
    assert reads == 1
    assert cached_reads == 1
