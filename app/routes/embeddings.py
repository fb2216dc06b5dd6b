"""`POST /v1/embeddings`: request → job → stream → worker → response."""

from __future__ import annotations

import time

from fastapi import APIRouter

from app.errors import DeadlineExceeded, InferenceFailed, InvalidRequest, Unavailable
from app.responses import JSONResponse
from app.schemas import EmbeddingRequest, EmbeddingResponse, ErrorBody
from app.state import StateDep
from models.registry import ModelKind
from workers.protocol import Job, JobStatus, JobType

router = APIRouter(tags=["embeddings"])

ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 429, 500, 503, 504)}


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingResponse,
    responses=ERRORS,  # type: ignore[arg-type]
    summary="Embed text",
)
async def create_embeddings(body: EmbeddingRequest, state: StateDep) -> JSONResponse:
    """Embed one string or a list of strings with an embedding model (OpenAI's shape)."""
    spec = state.model(body.model, ModelKind.EMBEDDING)
    assert spec.dimension is not None
    settings = state.settings
    texts = body.texts
    if len(texts) > settings.max_inputs:
        raise InvalidRequest(
            f"Invalid 'input': {len(texts)} items, at most {settings.max_inputs} per request.",
            param="input",
        )
    for index, text in enumerate(texts):
        param = "input" if isinstance(body.input, str) else f"input[{index}]"
        if not text:
            raise InvalidRequest(f"Invalid '{param}': must not be empty.", param=param)
        if len(text) > settings.max_input_chars:
            raise InvalidRequest(
                f"Invalid '{param}': {len(text)} characters, at most {settings.max_input_chars}.",
                param=param,
            )
    if body.dimensions is not None and body.dimensions > spec.dimension:
        raise InvalidRequest(
            f"Invalid 'dimensions': {body.dimensions}; model '{spec.id}' has {spec.dimension}, "
            f"so use 1 to {spec.dimension}.",
            param="dimensions",
        )
    if not await state.fleet.holders(spec.id):
        raise Unavailable(
            f"No live worker holds the model '{spec.id}'; start one with `hearth worker`.",
            code="no_worker",
        )

    job = Job(
        type=JobType.EMBEDDINGS,
        model=spec.id,
        input={
            "input": texts,
            "encoding_format": body.encoding_format,
            "dimensions": body.dimensions,
        },
        deadline=time.time() + settings.request_timeout_s,
        reply_to=state.dispatcher.channel,
    )
    try:
        reply = await state.dispatcher.run(job)
    except TimeoutError:
        raise DeadlineExceeded(
            f"No result within {settings.request_timeout_s:g} s; the job was cancelled.",
            code="deadline_exceeded",
        ) from None
    if reply["status"] != JobStatus.SUCCEEDED:
        error = reply.get("error") or {}
        raise InferenceFailed(
            error.get("message", f"the job ended {reply['status']}"), code=reply["status"]
        )
    return JSONResponse(reply["result"])
