"""`GET /v1/models` and `GET /v1/models/{id}`, with the live workers holding each."""

from __future__ import annotations

from fastapi import APIRouter

from app.schemas import ErrorBody, ModelCard, ModelList
from app.state import AppState, StateDep
from models.registry import ModelSpec

router = APIRouter(tags=["models"])


async def _card(state: AppState, spec: ModelSpec) -> ModelCard:
    return ModelCard(
        id=spec.id,
        created=spec.created,
        kind=spec.kind.value,
        dimension=spec.dimension,
        max_tokens=spec.max_tokens,
        workers=await state.fleet.holders(spec.id),
        aliases=list(spec.aliases),
    )


@router.get("/v1/models", response_model=ModelList, summary="List models")
async def list_models(state: StateDep) -> ModelList:
    """Every model this deployment serves."""
    return ModelList(data=[await _card(state, spec) for spec in state.served.values()])


@router.get(
    "/v1/models/{model_id}",
    response_model=ModelCard,
    responses={404: {"model": ErrorBody}},
    summary="Describe a model",
)
async def get_model(model_id: str, state: StateDep) -> ModelCard:
    """One model, by its id or one of its aliases."""
    return await _card(state, state.model(model_id))
