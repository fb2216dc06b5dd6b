"""What one API process holds for its lifetime, and the dependencies that hand it out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from app.dispatcher import Dispatcher
from app.errors import InvalidRequest
from app.fleet import Fleet
from app.telemetry import Metrics
from hearth.settings import Settings
from models.registry import ModelKind, ModelSpec, Registry, UnknownModelError
from workers.webhooks import WebhookSender


@dataclass
class AppState:
    settings: Settings
    redis: Redis  # requests' round trips, from a bounded pool
    subscriber: Redis  # event-stream subscriptions, one connection each
    registry: Registry  # every model the store holds, by id and alias
    served: dict[str, ModelSpec]  # the models this deployment serves, by id
    dispatcher: Dispatcher
    webhooks: WebhookSender  # deliveries for the jobs this process ends, drained at shutdown
    fleet: Fleet
    metrics: Metrics
    api_keys: list[str]  # empty: no key needed
    rate_limiter: AsyncScript  # the token bucket script

    async def close_connections(self) -> None:
        """Close every Redis client and connection this state holds."""
        for client in (self.redis, self.subscriber):
            await client.aclose()
        await self.dispatcher.submits.close()  # done already when the dispatcher stopped

    def model(self, model_id: str, kind: ModelKind | None = None) -> ModelSpec:
        """The served model ``model_id`` (or aliased so): 404 when unknown, 400 when of
        another ``kind``."""
        spec = self.registry.get(model_id)  # by its id or an alias
        if spec.id not in self.served:
            raise UnknownModelError(model_id)
        if kind is not None and spec.kind is not kind:
            raise InvalidRequest(
                f"Invalid 'model': '{model_id}' is an {spec.kind.value} model, "
                f"this route needs an {kind.value} model.",
                param="model",
                code="wrong_model_kind",
            )
        return spec


async def get_state(request: Request) -> AppState:
    # async: FastAPI would run a plain function in a thread pool, for every request.
    state: AppState = request.app.state.hearth
    return state


StateDep = Annotated[AppState, Depends(get_state)]
