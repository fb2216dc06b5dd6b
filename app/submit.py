"""From a prepared job to the HTTP answer, for every route that takes work.

Synchronous by default: queue the job, wait for its end, answer with its
result. With ``Prefer: respond-async`` (or through `POST /v1/jobs`), answer
``202 Accepted`` with the queued job and a ``Location`` to poll instead.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import Request, Response
from pydantic import BaseModel

from app.auth import key_digest
from app.dispatcher import DeadlinePassed
from app.errors import Conflict, DeadlineExceeded, InferenceFailed, InvalidRequest, Unavailable
from app.idempotency import Idempotency
from app.responses import JSONResponse
from app.state import AppState
from app.telemetry import STARTED
from workers.protocol import Job, JobStatus, absolute_urls, job_view


def wants_async(request: Request) -> bool:
    prefer = request.headers.get("prefer", "")
    return any(part.strip().lower() == "respond-async" for part in prefer.split(","))


def public_base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


# Builds the job for a request, given its deadline (seconds from now) and the
# reply channel of the API process waiting for it (None when nobody waits).
Prepare = Callable[[float, str | None], Job]


IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
ANYONE = "anyone"  # the one caller of a deployment without API keys (not a hex digest)


def idempotency(request: Request, job: Job, parameters: BaseModel) -> Idempotency | None:
    """The request's ``Idempotency-Key``, if it has one: the same caller sending
    the same request (job type, parameters, webhook) with it again gets the same
    job; another request with it is refused."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not IDEMPOTENCY_KEY.match(key):
        raise InvalidRequest(
            "Invalid 'Idempotency-Key' header: 1 to 255 printable ASCII characters, no spaces.",
            param="Idempotency-Key",
            code="invalid_value",
        )
    # The parameters as validated, not the job's input: that holds the seed
    # drawn when none was asked for, different for every retry of one request.
    # The model as served, not as named: an alias and its model's id ask for one thing.
    described = {
        "type": job.type.value,
        "parameters": {**parameters.model_dump(mode="json"), "model": job.model},
        "webhook": job.webhook,
    }
    digest = hashlib.sha256(orjson.dumps(described, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return Idempotency(caller=key_digest(request) or ANYONE, key=key, request=digest)


async def accept(
    state: AppState, request: Request, job: Job, parameters: BaseModel
) -> JSONResponse:
    """Queue ``job``, made from ``parameters`` (or find the job submitted earlier
    with the same key); answer 202."""
    job_id = await state.dispatcher.submit(job, idempotency(request, job, parameters))
    if job_id == job.id:
        record = {key.encode(): str(value).encode() for key, value in job.hash_fields().items()}
        view = job_view(job.id, record)
    else:
        earlier = await state.dispatcher.view(job_id)
        if earlier is None:  # it expired since the submit found it
            raise Conflict(
                f"The Idempotency-Key belongs to job '{job_id}', which has expired.",
                param="Idempotency-Key",
                code="idempotency_key_expired",
            )
        view = absolute_urls(earlier, public_base(request))
    return JSONResponse(
        view,
        status_code=202,
        headers={"Location": f"/v1/jobs/{job_id}", "Preference-Applied": "respond-async"},
    )


async def respond(
    state: AppState, request: Request, parameters: BaseModel, prepare: Prepare
) -> Response:
    """Answer a request with ``parameters`` (its validated body): its result, or 202
    when the client prefers to come back for it."""
    settings = state.settings
    if wants_async(request):
        return await accept(state, request, prepare(settings.job_timeout_s, None), parameters)
    job = prepare(settings.request_timeout_s, state.dispatcher.channel)
    if not await state.fleet.holders(job.model):
        raise Unavailable(
            f"No live worker holds the model '{job.model}'; start one with `hearth worker`.",
            code="no_worker",
        )
    try:
        reply = await state.dispatcher.run(job, idempotency(request, job, parameters))
    except DeadlinePassed as exc:
        waited = f"No result within {state.settings.request_timeout_s:g} s"
        if exc.cancelled:
            message = f"{waited}; the job was cancelled."
        else:
            message = (
                f"{waited}; job '{exc.job_id}', first sent with this Idempotency-Key, "
                f"goes on: GET /v1/jobs/{exc.job_id} follows it."
            )
        raise DeadlineExceeded(message, code="deadline_exceeded") from None
    if reply["status"] != JobStatus.SUCCEEDED:
        raise _failure(reply)
    headers = _timings(request, job, reply)
    if job.input.get("response_format") == "url":  # file links, relative until now
        view = absolute_urls({"result": orjson.loads(reply["result"])}, public_base(request))
        return JSONResponse(view["result"], headers=headers)
    # The body the worker encoded, sent as it is: no decoding and encoding again.
    return Response(reply["result"], media_type="application/json", headers=headers)


def _timings(request: Request, job: Job, reply: dict[str, Any]) -> dict[str, str]:
    """Where a synchronous request's time went, in milliseconds."""
    headers = {}
    started, finished = reply.get("started_at"), reply.get("finished_at")
    if started is not None and finished is not None:
        headers["x-queue-time"] = f"{max(0.0, started - job.created_at) * 1000:.1f}"
        headers["x-inference-time"] = f"{max(0.0, finished - started) * 1000:.1f}"
    arrived = request.scope.get(STARTED)
    if arrived is not None:
        headers["x-total-time"] = f"{(time.perf_counter() - arrived) * 1000:.1f}"
    return headers


def _failure(reply: dict[str, Any]) -> Exception:
    error = reply.get("error") or {}
    message = error.get("message") or f"the job ended {reply['status']}"
    if error.get("type") == "invalid_request_error":
        code = error.get("code") or "invalid_for_model"
        return InvalidRequest(message, param=error.get("param"), code=code)
    return InferenceFailed(message, code=reply["status"])
