"""The API's view of the live workers, read from their heartbeats in Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

import orjson
import pytest
import redis
from redis.asyncio import Redis

from app import fleet as fleet_module
from app.fleet import Fleet
from hearth.embedded_redis import EmbeddedRedis
from tests.support import run_on_own_thread
from workers.protocol import Keys


@dataclass(frozen=True)
class Counted:
    """A private Redis, whose reads no other test makes, and a client counting them."""

    url: str
    counter: redis.Redis
    keys: Keys

    def reads(self) -> int:
        return hgetall_calls(self.counter)

    def beats(self, **workers: bytes) -> None:
        self.counter.hset(self.keys.workers(), mapping=workers)


@pytest.fixture
def counted(private_redis: EmbeddedRedis) -> Iterator[Counted]:
    counter = redis.Redis.from_url(private_redis.url)
    yield Counted(private_redis.url, counter, Keys("fleet"))
    counter.close()


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
    counted: Counted,
) -> None:
    counted.beats(w1=beat(["a"], 0))

    async def main() -> tuple[list[list[str]], int, int]:
        client = Redis.from_url(counted.url)
        try:
            fleet = Fleet(client, counted.keys, ttl_s=10)
            before = counted.reads()
            leaving = asyncio.ensure_future(fleet.holders("a"))
            asking = [asyncio.ensure_future(fleet.holders("a")) for _ in range(40)]
            await asyncio.sleep(0)
            leaving.cancel()
            answers = await asyncio.gather(*asking)
            first = counted.reads() - before
            # Within the cache's second: no read at all.
            await fleet.holders("a")
            cached = counted.reads() - before
            return answers, first, cached
        finally:
            await client.aclose()

    answers, reads, cached_reads = run_on_own_thread(main)
    assert answers == [["w1"]] * 40
    assert reads == 1
    assert cached_reads == 1


def test_a_list_past_its_second_is_served_while_a_read_refreshes_it(
    counted: Counted, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted.beats(w1=beat(["a"], 0))

    async def main() -> dict[str, object]:
        client = Redis.from_url(counted.url)
        fleet = Fleet(client, counted.keys, ttl_s=10)
        try:
            seen: dict[str, object] = {"first": await fleet.holders("a")}
            counted.beats(w2=beat(["a"], 0))
            monkeypatch.setattr(fleet_module, "CACHE_S", 0.0)  # every list is past its second
            reads = counted.reads()
            # The old list still names a holder of "a": served as it is, no read waited on.
            seen["stale"] = await fleet.holders("a")
            seen["read_meanwhile"] = counted.reads() - reads
            # ... while a read refreshes it in the background.
            for _ in range(500):
                if counted.reads() > reads:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            seen["refreshed"] = await fleet.holders("a")
            # It names no holder of "c": that request waits for a fresh read.
            counted.beats(w3=beat(["c"], 0))
            seen["unheld"] = await fleet.holders("c")
            return seen
        finally:
            await fleet.stop()
            await client.aclose()

    seen = run_on_own_thread(main)
    assert seen["first"] == ["w1"]
    assert seen["stale"] == ["w1"]
    assert seen["read_meanwhile"] == 0
    assert seen["refreshed"] == ["w1", "w2"]
    assert seen["unheld"] == ["w3"]


def test_a_holder_whose_heartbeat_has_aged_past_the_ttl_is_not_served_from_the_list(
    counted: Counted, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted.beats(w1=beat(["a"], 9.7))  # the TTL is 10 s

    async def main() -> tuple[list[str], list[str]]:
        client = Redis.from_url(counted.url)
        fleet = Fleet(client, counted.keys, ttl_s=10)
        try:
            first = await fleet.holders("a")
            monkeypatch.setattr(fleet_module, "CACHE_S", 0.0)
            await asyncio.sleep(0.5)  # w1's heartbeat, as read, is now past the TTL
            return first, await fleet.holders("a")
        finally:
            await fleet.stop()
            await client.aclose()

    first, later = run_on_own_thread(main)
    assert first == ["w1"]
    assert later == []  # read afresh, not served from the list: w1 is pruned
    assert counted.counter.hkeys(counted.keys.workers()) == []
