"""`POST /v1/embeddings`: request → job → stream → worker → response."""

from __future__ import annotations

import time
from functools import partial

from fastapi import APIRouter, Request, Response

from app.errors import InvalidRequest
from app.schemas import WORK_ERRORS, EmbeddingRequest, EmbeddingResponse
from app.state import AppState, StateDep
from app.submit import respond
from models.registry import ModelKind
from workers.protocol import Job, JobType

router = APIRouter(tags=["embeddings"])


def prepare(
    body: EmbeddingRequest, state: AppState, deadline_s: float, reply_to: str | None = None
) -> Job:
    """Check ``body`` against the model and the limits; the job to queue for it."""
    spec = state.model(body.model, ModelKind.EMBEDDING)
    settings = state.settings
    texts = body.texts
    if len(texts) > settings.max_inputs:
        raise InvalidRequest(
            f"Invalid 'input': {len(texts)} items, at most {settings.max_inputs} per request.",
            param="input",
            code="invalid_value",
        )
    for index, text in enumerate(texts):
        param = "input" if isinstance(body.input, str) else f"input[{index}]"
        if not text:
            raise InvalidRequest(
                f"Invalid '{param}': must not be empty.", param=param, code="invalid_value"
            )
        if len(text) > settings.max_input_chars:
            raise InvalidRequest(
                f"Invalid '{param}': {len(text)} characters, at most {settings.max_input_chars}.",
                param=param,
                code="invalid_value",
            )
    if body.dimensions is not None and spec.dimension and body.dimensions > spec.dimension:
        raise InvalidRequest(
            f"Invalid 'dimensions': {body.dimensions}; model '{spec.id}' has {spec.dimension}, "
            f"so use 1 to {spec.dimension}.",
            param="dimensions",
            code="invalid_value",
        )
    return Job(
        type=JobType.EMBEDDINGS,
        model=spec.id,
        input={
            "input": texts,
            "encoding_format": body.encoding_format,
            "dimensions": body.dimensions,
        },
        deadline=time.time() + deadline_s,
        reply_to=reply_to,
    )


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingResponse,
    responses=WORK_ERRORS,
    summary="Embed text",
)
async def create_embeddings(body: EmbeddingRequest, request: Request, state: StateDep) -> Response:
    """Embed one string or a list of strings with an embedding model (OpenAI's shape).

    With `Prefer: respond-async` the answer is `202` with a job to poll instead.
    """
    return await respond(state, request, body, partial(prepare, body, state))
