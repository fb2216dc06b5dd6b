"""API keys and per-key rate limits.

With ``HEARTH_API_KEYS`` (or ``HEARTH_API_KEYS_FILE``) set, every `/v1/` route
needs ``Authorization: Bearer <key>``; liveness, readiness, metrics, the
playground page and the docs do not. Keys are compared in constant time and
never logged or stored: Redis sees only a digest. With
``HEARTH_RATE_LIMIT_PER_S`` set, each key (or, without keys, each client
address) gets a token bucket kept in Redis, so the limit holds across API
replicas; past it, 429 with ``Retry-After``. The key's digest also scopes the
caller's ``Idempotency-Key`` headers, so that callers never share jobs.

Both checks run as ASGI middleware, before any routing or body parsing: a
request refused here costs nothing more, and one let through pays no
per-request dependency resolution for them. The OpenAPI document still shows
the bearer scheme on every `/v1/` operation (``document_security``).
"""

from __future__ import annotations

import hashlib
import hmac
import math
from typing import Any

from fastapi import Request
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import HearthError, Overloaded, Unauthorized, response_for, translate
from app.state import AppState

PROTECTED_PREFIX = "/v1/"
SCHEME = "HTTPBearer"  # the security scheme's name in the OpenAPI document
SCHEME_DESCRIPTION = "An API key, when the deployment sets any."
DIGEST = "key_digest"  # the request state's entry: the accepted key's digest

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
    """The digest of the API key ``Authorize`` accepted for ``request``; None
    when the deployment sets no keys."""
    digest: str | None = request.scope.get("state", {}).get(DIGEST)
    return digest


def bearer_token(scope: Scope) -> str:
    """The credentials of the request's ``Authorization: Bearer`` header; "" when
    it has none, or another scheme."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            return credentials if scheme.lower() == "bearer" else ""
    return ""


class Authorize:
    """ASGI middleware: a `/v1/` request passes the API key check (when keys are
    set), then the caller's rate limit (when set), or is answered 401 or 429."""

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state
        self.active = bool(state.api_keys or state.settings.rate_limit_per_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.active and scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIX):
            try:
                digest = await self.check(scope)
            except (HearthError, RedisConnectionError, RedisTimeoutError) as exc:
                await response_for(translate(exc))(scope, receive, send)
                return
            if digest is not None:
                scope.setdefault("state", {})[DIGEST] = digest
        await self.app(scope, receive, send)

    async def check(self, scope: Scope) -> str | None:
        """The accepted key's digest (None without keys); raises Unauthorized or Overloaded."""
        state = self.state
        client = scope.get("client")
        caller = client[0] if client else "unknown"
        digest = None
        if state.api_keys:
            given = bearer_token(scope)
            # Compare with every key, so the time taken says nothing about which matched.
            matches = [hmac.compare_digest(given.encode(), key.encode()) for key in state.api_keys]
            if not given or not any(matches):
                raise Unauthorized(
                    "Missing or wrong API key: send `Authorization: Bearer <key>`.",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            caller = digest = _digest(given)
        await self._limit(caller)
        return digest

    async def _limit(self, caller: str) -> None:
        """Take a token from ``caller``'s bucket (when a rate limit is set), or raise 429."""
        state = self.state
        settings = state.settings
        if not settings.rate_limit_per_s:
            return
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


def document_security(schema: dict[str, Any]) -> dict[str, Any]:
    """Show the bearer scheme in the OpenAPI document, on every `/v1/` operation."""
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes[SCHEME] = {"type": "http", "description": SCHEME_DESCRIPTION, "scheme": "bearer"}
    for path, operations in schema["paths"].items():
        if path.startswith(PROTECTED_PREFIX):
            for operation in operations.values():
                operation["security"] = [{SCHEME: []}]
    return schema
