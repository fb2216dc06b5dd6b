"""Queued jobs: submit, look up, follow as server-sent events, cancel."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.errors import Conflict, HearthError, InvalidRequest, NotFound, translate, within
from app.responses import JSONResponse
from app.routes import embeddings, images
from app.schemas import EmbeddingsJob, ErrorBody, JobRequest, JobView
from app.state import AppState, StateDep
from app.submit import accept, public_base
from models.registry import UnknownModelError
from workers.protocol import TERMINAL_STATUSES, JobStatus, absolute_urls

router = APIRouter(tags=["jobs"])
logger = logging.getLogger(__name__)

EVENT_POLL_S = 5.0  # how often a quiet event stream rereads the job, in case an event was missed


@router.post(
    "/v1/jobs",
    status_code=202,
    response_model=JobView,
    responses={400: {"model": ErrorBody}, 404: {"model": ErrorBody}},
    summary="Queue a job",
)
async def create_job(body: JobRequest, request: Request, state: StateDep) -> JSONResponse:
    """Queue the body of `POST /v1/embeddings` or `/v1/images/generations` as a job.

    Answers `202` at once with the job and its `Location`; the job runs when a
    worker for its model is free, or ends `expired` past `HEARTH_JOB_TIMEOUT_S`.
    """
    webhook = str(body.webhook) if body.webhook is not None else None
    if webhook and state.settings.webhook_secret is None:
        raise InvalidRequest(
            "Invalid 'webhook': this deployment cannot sign webhooks "
            "(HEARTH_WEBHOOK_SECRET is not set).",
            param="webhook",
            code="webhooks_disabled",
        )
    deadline = state.settings.job_timeout_s
    try:
        if isinstance(body, EmbeddingsJob):
            job = embeddings.prepare(body.input, state, deadline)
        else:
            job = images.prepare(body.input, state, deadline)
    except (HearthError, UnknownModelError) as exc:
        # The routes name fields of their own body, which here sits in 'input'.
        raise within("input", translate(exc)) from None
    if webhook:
        job = job.with_webhook(webhook)
    return await accept(state, request, job, body.input)


async def _view(state: AppState, request: Request, job_id: str) -> dict[str, Any]:
    view = await state.dispatcher.view(job_id)
    if view is None:
        raise NotFound(f"No job '{job_id}': it never existed or has expired.", code="job_not_found")
    return absolute_urls(view, public_base(request))


@router.get(
    "/v1/jobs/{job_id}",
    response_model=JobView,
    responses={404: {"model": ErrorBody}},
    summary="Look up a job",
)
async def get_job(job_id: str, request: Request, state: StateDep) -> JSONResponse:
    """Status, progress, timestamps, attempts, and the result or error once it ended."""
    return JSONResponse(await _view(state, request, job_id))


@router.delete(
    "/v1/jobs/{job_id}",
    response_model=JobView,
    responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
    summary="Cancel a job",
)
async def cancel_job(job_id: str, request: Request, state: StateDep) -> JSONResponse:
    """A queued job never runs; a running one stops at its next denoising step.

    A job that already ended is left as it is: `409` says so.
    """
    view = await _view(state, request, job_id)
    if view["status"] in TERMINAL_STATUSES or not await state.dispatcher.cancel(job_id):
        view = await _view(state, request, job_id)
        raise Conflict(
            f"Job '{job_id}' already ended ({view['status']}); there is nothing to cancel.",
            code="job_ended",
        )
    logger.info("job cancelled by the client", extra={"job_id": job_id})
    return JSONResponse(await _view(state, request, job_id))


def _event(name: str, data: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(data=orjson.dumps(data).decode(), event=name)


@router.get(
    "/v1/jobs/{job_id}/events",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}}, 404: {"model": ErrorBody}},
    summary="Follow a job",
)
async def job_events(job_id: str, request: Request, state: StateDep) -> EventSourceResponse:
    """Server-sent events: the job's current state first (`queued` or `started`, with
    the job), then `started`, `progress` (`step`, `total`), and one final event
    named after its final status, carrying the job. The stream then ends."""
    await _view(state, request, job_id)  # 404 before the stream starts
    return EventSourceResponse(_follow(state, request, job_id), ping=15)


async def _follow(state: AppState, request: Request, job_id: str) -> AsyncIterator[ServerSentEvent]:
    pubsub = state.subscriber.pubsub(ignore_subscribe_messages=True)
    try:
        # Subscribe before reading the state, so nothing falls between the two.
        await pubsub.subscribe(state.dispatcher.keys.events(job_id))
        view = await _view(state, request, job_id)
        while view["status"] not in TERMINAL_STATUSES:
            name = "queued" if view["status"] == JobStatus.QUEUED else "started"
            yield _event(name, view)
            if view["progress"]:
                yield _event("progress", view["progress"])
            while True:
                message = await pubsub.get_message(timeout=EVENT_POLL_S)
                if message is None:
                    view = await _view(state, request, job_id)
                    if view["status"] in TERMINAL_STATUSES:
                        break
                    continue
                event = orjson.loads(message["data"])
                if event["event"] == "progress":
                    yield _event("progress", {"step": event["step"], "total": event["total"]})
                    continue
                view = await _view(state, request, job_id)
                break
        yield _event(view["status"], view)
    finally:
        with contextlib.suppress(Exception):
            await pubsub.aclose()  # type: ignore[no-untyped-call]
