"""The FastAPI application: settings → Redis → registry → routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry  # the asyncio one: redis.retry's never awaits a retry
from redis.backoff import ExponentialBackoff

import hearth
from app import errors
from app.auth import TOKEN_BUCKET_SCRIPT, Authorize, document_security
from app.dispatcher import Dispatcher
from app.docs import DocsPolicy, document_errors
from app.fleet import Fleet
from app.limits import BodyLimit
from app.routes import embeddings, files, health, images, jobs, metrics, models, playground
from app.shortcut import Shortcut, work_routes
from app.state import AppState
from app.telemetry import Metrics, Telemetry
from hearth.memory import freeze_startup_objects
from hearth.settings import Settings, get_settings
from models.registry import Registry
from workers.protocol import Keys
from workers.webhooks import WebhookSender

SUBSCRIBER_CONNECTIONS = 65_536  # one per event-stream follower


def build_state(settings: Settings) -> AppState:
    redis_url = settings.redis_url
    if not redis_url:
        raise ValueError("REDIS_URL is not set: the API needs a Redis to queue jobs in")
    # Fail fast when Redis is down: a client gets 503 in seconds, not a hang.
    options: dict[str, Any] = {
        "socket_connect_timeout": settings.redis_timeout_s,
        "socket_timeout": settings.redis_timeout_s,
        "health_check_interval": 30,
    }

    def request_pool(socket_timeout: float | None) -> Redis:
        # Requests share a bounded set of connections, each held for a round trip
        # or two; past the bound a request waits its turn rather than failing.
        pool = BlockingConnectionPool.from_url(
            redis_url,
            max_connections=settings.redis_max_connections,
            timeout=settings.redis_timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
            **{**options, "socket_timeout": socket_timeout},
        )
        return Redis.from_pool(pool)

    redis = request_pool(settings.redis_timeout_s)
    # The dispatcher's submits: their pipelines are timed as a whole (see
    # Dispatcher) rather than reply by reply.
    submits = request_pool(None)
    # Event-stream followers each hold a subscription for as long as they watch:
    # they get connections of their own, so they never starve the requests.
    subscriber = Redis.from_url(redis_url, max_connections=SUBSCRIBER_CONNECTIONS, **options)
    keys = Keys(settings.namespace)
    registry = Registry.scan(settings.model_store)
    served = {spec.id: spec for spec in registry.select(settings.models)}
    # The API tells the webhooks of the jobs it ends itself: cancelled, or expired in the queue.
    webhooks = WebhookSender(settings, redis, keys)
    return AppState(
        settings=settings,
        redis=redis,
        subscriber=subscriber,
        registry=registry,
        served=served,
        dispatcher=Dispatcher(
            redis,
            keys,
            settings.result_ttl_s,
            settings.max_queue_depth,
            webhooks,
            submits=submits,
            submit_timeout_s=settings.redis_timeout_s,
        ),
        webhooks=webhooks,
        fleet=Fleet(redis, keys, settings.worker_ttl_s),
        metrics=Metrics(),
        api_keys=settings.all_api_keys(),
        rate_limiter=redis.register_script(TOKEN_BUCKET_SCRIPT),
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    state = build_state(settings or get_settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.dispatcher.start()
        freeze_startup_objects()
        try:
            yield
        finally:
            await state.dispatcher.stop()
            await state.fleet.stop()
            await state.webhooks.drain()
            await state.close_connections()

    # The docs pages load their scripts from this server, never from a CDN (app/docs.py).
    app = FastAPIOffline(
        title="Hearth",
        version=hearth.__version__,
        summary="Text embeddings and generated images over HTTP, OpenAI-compatible.",
        lifespan=lifespan,
    )
    app.state.hearth = state
    errors.install(app)
    for module in (embeddings, images, jobs, files, models):  # /v1/: Authorize checks them
        app.include_router(module.router)
    app.include_router(health.router)  # probes and metrics need no key
    app.include_router(playground.router)  # a public page; its API calls need the key
    app.include_router(metrics.router)

    # Innermost: a request takes the shortcut once its key and size are checked.
    app.add_middleware(Shortcut, state=state, routes=work_routes())
    # Inside BodyLimit: a body over the limit is refused before the key is checked.
    app.add_middleware(Authorize, state=state)
    app.add_middleware(BodyLimit, max_bytes=state.settings.max_body_bytes)
    app.add_middleware(Telemetry, metrics=state.metrics)
    app.add_middleware(DocsPolicy)

    build_document = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_security(document_errors(build_document()))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
