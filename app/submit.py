"""From a prepared job to the HTTP answer, for every route that takes work.

Synchronous by default: queue the job, wait for its end, answer with its
result. With ``Prefer: respond-async`` (or through `POST /v1/jobs`), answer
``202 Accepted`` with the queued job and a ``Location`` to poll instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Request

from app.errors import DeadlineExceeded, InferenceFailed, InvalidRequest, Unavailable
from app.responses import JSONResponse
from app.state import AppState
from workers.protocol import Job, JobStatus, absolute_urls, job_view


def wants_async(request: Request) -> bool:
    prefer = request.headers.get("prefer", "")
    return any(part.strip().lower() == "respond-async" for part in prefer.split(","))


def public_base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


# Builds the job for a request, given its deadline (seconds from now) and the
# reply channel of the API process waiting for it (None when nobody waits).
Prepare = Callable[[float, str | None], Job]


async def accept(state: AppState, job: Job) -> JSONResponse:
    """Queue ``job`` and answer 202 with it."""
    await state.dispatcher.submit(job)
    record = {key.encode(): str(value).encode() for key, value in job.hash_fields().items()}
    return JSONResponse(
        job_view(job.id, record),
        status_code=202,
        headers={"Location": f"/v1/jobs/{job.id}", "Preference-Applied": "respond-async"},
    )


async def respond(state: AppState, request: Request, prepare: Prepare) -> JSONResponse:
    """Answer a request: its result, or 202 when the client prefers to come back for it."""
    settings = state.settings
    if wants_async(request):
        return await accept(state, prepare(settings.job_timeout_s, None))
    job = prepare(settings.request_timeout_s, state.dispatcher.channel)
    if not await state.fleet.holders(job.model):
        raise Unavailable(
            f"No live worker holds the model '{job.model}'; start one with `hearth worker`.",
            code="no_worker",
        )
    try:
        reply = await state.dispatcher.run(job)
    except TimeoutError:
        raise DeadlineExceeded(
            f"No result within {state.settings.request_timeout_s:g} s; the job was cancelled.",
            code="deadline_exceeded",
        ) from None
    if reply["status"] != JobStatus.SUCCEEDED:
        raise _failure(reply)
    result: dict[str, Any] = absolute_urls({"result": reply["result"]}, public_base(request))[
        "result"
    ]
    return JSONResponse(result)


def _failure(reply: dict[str, Any]) -> Exception:
    error = reply.get("error") or {}
    message = error.get("message") or f"the job ended {reply['status']}"
    if error.get("type") == "invalid_request_error":
        return InvalidRequest(message, param=error.get("param"), code="invalid_for_model")
    return InferenceFailed(message, code=reply["status"])
