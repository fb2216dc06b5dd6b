"""API keys and per-key rate limits.

With ``HEARTH_API_KEYS`` (or ``HEARTH_API_KEYS_FILE``) set, every route but
liveness, readiness and the docs needs ``Authorization: Bearer <key>``. Keys
are compared in constant time and never logged or stored: Redis sees only a
digest. With ``HEARTH_RATE_LIMIT_PER_S`` set, each key (or, without keys, each
client address) gets a token bucket kept in Redis, so the limit holds across
API replicas; past it, 429 with ``Retry-After``. The key's digest also scopes
the caller's ``Idempotency-Key`` headers, so that callers never share jobs.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.errors import Overloaded, Unauthorized
from app.state import StateDep

bearer = HTTPBearer(auto_error=False, description="An API key, when the deployment sets any.")

# KEYS[1] bucket; ARGV: tokens per second, burst. Takes one token if there is
# one and returns 0, else returns the seconds until one is there. Time is
# Redis's own, so API replicas with skewed clocks share one bucket fairly.
TOKEN_BUCKET_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(bucket[1]) or burst
local at = tonumber(bucket[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return tostring(wait)
"""


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def key_digest(request: Request) -> str | None:
    """The digest of the API key ``authorize`` accepted for ``request``; None
    when the deployment sets no keys."""
    digest: str | None = getattr(request.state, "key_digest", None)
    return digest


async def authorize(
    request: Request,
    state: StateDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """Check the API key (when keys are set), then the caller's rate limit (when set)."""
    settings = state.settings
    caller = request.client.host if request.client else "unknown"
    if state.api_keys:
        given = credentials.credentials if credentials is not None else ""
        # Compare with every key, so the time taken says nothing about which matched.
        matches = [hmac.compare_digest(given.encode(), key.encode()) for key in state.api_keys]
        if not given or not any(matches):
            raise Unauthorized(
                "Missing or wrong API key: send `Authorization: Bearer <key>`.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        caller = request.state.key_digest = _digest(given)
    if settings.rate_limit_per_s:
        burst = settings.rate_limit_burst or max(1, math.ceil(settings.rate_limit_per_s))
        wait = float(
            await state.rate_limiter(
                keys=[state.dispatcher.keys.rate_limit(caller)],
                args=[settings.rate_limit_per_s, burst],
            )
        )
        if wait > 0:
            raise Overloaded(
                f"Rate limit of {settings.rate_limit_per_s:g} requests/s reached; "
                f"retry in {wait:.2f} s.",
                code="rate_limited",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
