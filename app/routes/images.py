"""`POST /v1/images/generations`: text to image, OpenAI's shape plus extensions."""

from __future__ import annotations

import random
import time
from functools import partial

from fastapi import APIRouter, Request, Response

from app.errors import InvalidRequest
from app.schemas import WORK_ERRORS, ImageGenerationRequest, ImageResponse
from app.state import AppState, StateDep
from app.submit import respond
from models.image_config import ImageLimits
from models.registry import ModelKind
from workers.protocol import Job, JobType

router = APIRouter(tags=["images"])


def _size(body: ImageGenerationRequest, limits: ImageLimits) -> tuple[int, int]:
    if body.size is None or body.size == "auto":
        return limits.default_width, limits.default_height
    width, height = (int(part) for part in body.size.split("x"))
    step = limits.size_step
    if width % step or height % step:
        raise InvalidRequest(
            f"Invalid 'size': {body.size}; width and height must be multiples of {step} "
            "for this model.",
            param="size",
            code="invalid_value",
        )
    if not (limits.min_size <= width <= limits.max_width) or not (
        limits.min_size <= height <= limits.max_height
    ):
        raise InvalidRequest(
            f"Invalid 'size': {body.size}; this model takes widths {limits.min_size} to "
            f"{limits.max_width} and heights {limits.min_size} to {limits.max_height}.",
            param="size",
            code="invalid_value",
        )
    return width, height


def _at_most(param: str, value: float, limit: float) -> None:
    if value > limit:
        raise InvalidRequest(
            f"Invalid '{param}': {value:g}; at most {limit:g} for this model.",
            param=param,
            code="invalid_value",
        )


def prepare(
    body: ImageGenerationRequest,
    state: AppState,
    deadline_s: float,
    reply_to: str | None = None,
) -> Job:
    """Check ``body`` against the model's limits; the job to queue for it."""
    spec = state.model(body.model, ModelKind.IMAGE)
    assert spec.image is not None
    limits = spec.image
    width, height = _size(body, limits)
    steps = body.num_inference_steps or limits.default_steps
    guidance = limits.default_guidance if body.guidance_scale is None else body.guidance_scale
    _at_most("n", body.n, limits.max_n)
    _at_most("num_inference_steps", steps, limits.max_steps)
    _at_most("guidance_scale", guidance, limits.max_guidance)
    for param, text in (("prompt", body.prompt), ("negative_prompt", body.negative_prompt or "")):
        if len(text) > limits.max_prompt_chars:
            raise InvalidRequest(
                f"Invalid '{param}': {len(text)} characters, at most {limits.max_prompt_chars}.",
                param=param,
                code="invalid_value",
            )
    scheduler = ""
    if body.scheduler is not None:
        if body.scheduler not in limits.schedulers:
            names = ", ".join(sorted(limits.schedulers))
            raise InvalidRequest(
                f"Invalid 'scheduler': {body.scheduler!r}; this model takes one of: {names}.",
                param="scheduler",
                code="invalid_value",
            )
        scheduler = limits.schedulers[body.scheduler]
    fewest = limits.min_steps(scheduler or limits.default_scheduler)
    if steps < fewest:
        which = f"scheduler '{body.scheduler}'" if body.scheduler else "this model's scheduler"
        raise InvalidRequest(
            f"Invalid 'num_inference_steps': {steps}; {which} takes at least {fewest}.",
            param="num_inference_steps",
            code="invalid_value",
        )
    return Job(
        type=JobType.IMAGES_GENERATIONS,
        model=spec.id,
        input={
            "prompt": body.prompt,
            "negative_prompt": body.negative_prompt or "",
            "n": body.n,
            "width": width,
            "height": height,
            "steps": steps,
            "guidance": guidance,
            "seed": body.seed if body.seed is not None else random.randrange(2**32),
            "scheduler": scheduler,
            "response_format": body.response_format,
        },
        deadline=time.time() + deadline_s,
        reply_to=reply_to,
    )


@router.post(
    "/v1/images/generations",
    response_model=ImageResponse,
    responses=WORK_ERRORS,
    summary="Generate images",
)
async def create_images(
    body: ImageGenerationRequest, request: Request, state: StateDep
) -> Response:
    """Generate `n` images from a prompt (OpenAI's shape).

    Extensions: `negative_prompt`, `num_inference_steps`, `guidance_scale`,
    `seed`, `scheduler`. With `Prefer: respond-async` the answer is `202` with
    a job to poll or follow (`GET /v1/jobs/{id}/events`).
    """
    return await respond(state, request, body, partial(prepare, body, state))
