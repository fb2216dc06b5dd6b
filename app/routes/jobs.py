"""Queued jobs: submit, look up, follow as server-sent events, cancel."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.errors import (
    Conflict,
    HearthError,
    InvalidRequest,
    NotFound,
    Unavailable,
    envelope,
    translate,
    within,
)
from app.responses import JSONResponse
from app.routes import embeddings, images
from app.schemas import EmbeddingsJob, ErrorBody, ImageEditsJob, JobRequest, JobView
from app.state import AppState, StateDep
from app.submit import accept, public_base
from models.registry import UnknownModelError
from workers.protocol import TERMINAL_STATUSES, JobStatus, absolute_urls, listener

router = APIRouter(tags=["jobs"])
logger = logging.getLogger(__name__)

EVENT_POLL_S = 5.0  # how often a quiet event stream rereads the job, in case an event was missed
DEADLINE_SLACK_S = 0.05  # a queued job is reread this long past its deadline, when it has passed
FOLLOW_RETRY_S = 0.5  # a follower's pause between attempts to reach Redis again


@router.post(
    "/v1/jobs",
    status_code=202,
    response_model=JobView,
    responses={400: {"model": ErrorBody}, 404: {"model": ErrorBody}},
    summary="Queue a job",
)
async def create_job(body: JobRequest, request: Request, state: StateDep) -> JSONResponse:
    """Queue the body of `POST /v1/embeddings`, `/v1/images/generations` or
    `/v1/images/edits` (its files in base64) as a job.

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
        elif isinstance(body, ImageEditsJob):
            job = images.prepare_edit(body.input, state, deadline)
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
    named after its final status, carrying the job. The stream then ends. Should the
    job's record vanish, or Redis stay unreachable, the stream ends instead with an
    `error` event whose data is the error's envelope."""
    await _view(state, request, job_id)  # 404 before the stream starts
    return EventSourceResponse(_follow(state, request, job_id), ping=15)


async def _follow(state: AppState, request: Request, job_id: str) -> AsyncIterator[ServerSentEvent]:
    """The job's events to its end. Never raises: a stream cut short mid-body is
    all a client would see of an exception here.

    While Redis is unreachable the follower tries again, for up to
    ``HEARTH_FOLLOW_OUTAGE_S``: once back, it subscribes anew and rereads the
    record, so the final event still comes, and only once. A record gone for
    good, a longer outage, or anything unforeseen ends the stream with an
    ``error`` event carrying the error's envelope.
    """
    sent: str | None = None  # the state event sent last: a reconnect does not repeat it
    outage: float | None = None  # when Redis was found unreachable, while it still is
    while True:
        pubsub = listener(state.subscriber)
        try:
            # Subscribe before reading the state, so nothing falls between the two.
            await pubsub.subscribe(state.dispatcher.keys.events(job_id))
            view = await _view(state, request, job_id)
            outage = None
            deadline = (
                await _deadline(state, job_id) if view["status"] == JobStatus.QUEUED else None
            )
            resumed = sent is not None
            while view["status"] not in TERMINAL_STATUSES:
                name = "queued" if view["status"] == JobStatus.QUEUED else "started"
                if not (resumed and name == sent):
                    yield _event(name, view)
                    sent = name
                resumed = False
                if view["progress"]:
                    yield _event("progress", view["progress"])
                while True:
                    message = await pubsub.get_message(timeout=_poll_s(view, deadline))
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
            return
        except (RedisConnectionError, RedisTimeoutError, OSError, Unavailable) as exc:
            now = time.monotonic()
            if outage is None:  # once an outage, not at every attempt
                outage = now
                logger.warning(
                    "job events: Redis unreachable (%s); subscribing again",
                    exc,
                    extra={"job_id": job_id},
                )
            elif now - outage >= state.settings.follow_outage_s:
                yield _error(translate(exc))
                return
        except Exception as exc:  # NotFound: the record is gone; translate logs the unforeseen
            yield _error(translate(exc))
            return
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
        await asyncio.sleep(FOLLOW_RETRY_S)


def _error(error: HearthError) -> ServerSentEvent:
    return _event("error", envelope(error))


async def _deadline(state: AppState, job_id: str) -> float | None:
    """The queued job's deadline (not part of its view); None when its record lacks one."""
    deadline = await state.redis.hget(state.dispatcher.keys.job(job_id), "deadline")
    return float(deadline) if deadline is not None else None


def _poll_s(view: dict[str, Any], deadline: float | None) -> float:
    """How long to wait for an event before rereading the job. A queued job is
    also reread just past its deadline: that read ends it `expired`, while its
    record is still there to tell (deadline + result TTL may be under EVENT_POLL_S)."""
    if view["status"] != JobStatus.QUEUED or deadline is None:
        return EVENT_POLL_S
    until = deadline + DEADLINE_SLACK_S - time.time()
    return until if 0 < until < EVENT_POLL_S else EVENT_POLL_S
