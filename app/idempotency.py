"""Idempotency keys: the same request sent twice gets the one job.

A key belongs to its caller (the API key's digest; one shared caller where the
deployment has no keys) and holds to the request it first came with: its job
type, validated parameters and webhook, kept as a digest next to the job id
(``app.submit`` reads them off the request; the claim in Redis is here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from redis.asyncio import Redis

from app.errors import Conflict
from workers.protocol import Job, Keys


@dataclass(frozen=True)
class Idempotency:
    """A request's ``Idempotency-Key``, and what it takes for a second request to
    be the same one: the same caller, and the same ``request`` digest."""

    caller: str  # the API key's digest, or one shared name when the deployment has no keys
    key: str
    request: str  # digest of the job type and the request's parameters


async def claim(
    redis: Redis, keys: Keys, job: Job, ttl: int, idempotency: Idempotency
) -> str | None:
    """Tie the caller's key to ``job``; or, when an earlier request holds it,
    that request's job id.

    ``job``'s record is written before the key is taken, so whoever finds the
    key taken finds the record of the job it names, even while that job is
    still on its way to the stream. Two round trips, not one pipeline: on
    Redis Cluster the record and the key may live on different nodes, and a
    pipeline would not keep their writes in order.
    """
    record = keys.job(job.id)
    write = redis.pipeline(transaction=False)
    write.hset(record, mapping=job.hash_fields())
    write.expire(record, ttl)
    await write.execute()
    held = await redis.set(
        keys.idempotency(idempotency.caller, idempotency.key),
        f"{job.id} {idempotency.request}",
        nx=True,
        ex=ttl,
        get=True,
    )
    if held is None:
        return None
    earlier, _, request = cast(bytes, held).decode().partition(" ")
    check = redis.pipeline(transaction=False)
    check.delete(record)  # this job will not run: the earlier one answers
    check.exists(keys.job(earlier))
    _, found = await check.execute()
    if request != idempotency.request:
        raise Conflict(
            f"The Idempotency-Key '{idempotency.key}' was first sent with another request "
            "(another job type, model, input or webhook); send that same request again, "
            "or use a new key.",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    if not found:
        raise Conflict(
            f"The Idempotency-Key belongs to job '{earlier}', which has expired.",
            param="Idempotency-Key",
            code="idempotency_key_expired",
        )
    return earlier
