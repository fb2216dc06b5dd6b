"""Liveness and readiness, for load balancers and Kubernetes probes."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from app.errors import Unavailable
from app.schemas import ErrorBody
from app.state import StateDep

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    models: dict[str, list[str]]  # model id → live workers holding it


@router.get("/healthz", response_model=Health, summary="Liveness")
async def healthz() -> Health:
    """The API process is up. Says nothing of Redis or workers: see `/readyz`."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": ErrorBody}},
    summary="Readiness",
)
async def readyz(state: StateDep) -> Readiness:
    """Ready when Redis answers and a live worker holds every served model."""
    await state.redis.ping()
    holders = {model_id: await state.fleet.holders(model_id) for model_id in state.served}
    missing = sorted(model_id for model_id, workers in holders.items() if not workers)
    if missing:
        raise Unavailable(f"No live worker holds: {', '.join(missing)}.", code="no_worker")
    return Readiness(status="ready", models=holders)
