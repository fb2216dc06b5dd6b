"""`POST /v1/images/generations` (text to image) and `POST /v1/images/edits`
(image to image, inpainting): OpenAI's shapes plus extensions."""

from __future__ import annotations

import base64
import binascii
import io
import random
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, get_args, get_origin

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from app.errors import InvalidRequest
from app.schemas import WORK_ERRORS, ImageEditRequest, ImageGenerationRequest, ImageResponse
from app.state import AppState, StateDep
from app.submit import respond
from models.image_config import ImageLimits
from models.registry import ModelKind
from workers.protocol import Job, JobType

router = APIRouter(tags=["images"])

EDIT_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_EDIT_PIXELS = 4096 * 4096  # of an image or mask sent to edit, before any resizing
EXIF_ORIENTATION = 0x0112
QUARTER_TURNS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
EDIT_FILES = ("image", "mask")


def _fits(width: int, height: int, limits: ImageLimits, param: str, shown: str) -> None:
    """Refuse a size the model cannot make, naming ``param`` (whose value is ``shown``)."""
    step = limits.size_step
    if width % step or height % step:
        raise InvalidRequest(
            f"Invalid '{param}': {shown}; width and height must be multiples of {step} "
            "for this model.",
            param=param,
            code="invalid_value",
        )
    if not (limits.min_size <= width <= limits.max_width) or not (
        limits.min_size <= height <= limits.max_height
    ):
        raise InvalidRequest(
            f"Invalid '{param}': {shown}; this model takes widths {limits.min_size} to "
            f"{limits.max_width} and heights {limits.min_size} to {limits.max_height}.",
            param=param,
            code="invalid_value",
        )


def _size(body: ImageGenerationRequest, limits: ImageLimits) -> tuple[int, int] | None:
    """The size asked for; None for the default ("auto", or none given)."""
    if body.size is None or body.size == "auto":
        return None
    width, height = (int(part) for part in body.size.split("x"))
    _fits(width, height, limits, "size", body.size)
    return width, height


def _at_most(param: str, value: float, limit: float) -> None:
    if value > limit:
        raise InvalidRequest(
            f"Invalid '{param}': {value:g}; at most {limit:g} for this model.",
            param=param,
            code="invalid_value",
        )


def _image_model(state: AppState, model_id: str) -> tuple[str, ImageLimits]:
    """The id and limits of the image model ``model_id`` names (an alias, perhaps)."""
    spec = state.model(model_id, ModelKind.IMAGE)
    assert spec.image is not None
    return spec.id, spec.image


def _call(body: ImageGenerationRequest, limits: ImageLimits) -> dict[str, Any]:
    """The checked parameters of the pipeline call, those of both routes."""
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
    return {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt or "",
        "n": body.n,
        "steps": steps,
        "guidance": guidance,
        "seed": body.seed if body.seed is not None else random.randrange(2**32),
        "scheduler": scheduler,
        "response_format": body.response_format,
    }


def prepare(
    body: ImageGenerationRequest,
    state: AppState,
    deadline_s: float,
    reply_to: str | None = None,
) -> Job:
    """Check ``body`` against the model's limits; the job to queue for it."""
    model_id, limits = _image_model(state, body.model)
    width, height = _size(body, limits) or (limits.default_width, limits.default_height)
    return Job(
        type=JobType.IMAGES_GENERATIONS,
        model=model_id,
        input={**_call(body, limits), "width": width, "height": height},
        deadline=time.time() + deadline_s,
        reply_to=reply_to,
    )


@dataclass(frozen=True)
class Picture:
    """An image sent to edit: its base64 and what its header says."""

    base64: str
    width: int
    height: int


def _quarter_turned(image: Image.Image) -> bool:
    """Whether the EXIF orientation in ``image``'s header turns it a quarter
    (False where it has none, or one that cannot be read)."""
    if "exif" not in image.info:  # getexif() would decode a PNG's pixels to look further
        return False
    try:
        return image.getexif().get(EXIF_ORIENTATION) in QUARTER_TURNS
    except (SyntaxError, ValueError, OSError):
        return False


def picture(param: str, encoded: str) -> Picture:
    """Read the header of the image in ``encoded`` (base64 or a ``data:`` URL):
    its size as shown, upright as its EXIF orientation says.

    Only the header: the worker decodes the pixels, and answers a file that
    fails then as a 400 too.
    """
    data = encoded
    if data[:5].lower() == "data:":  # the scheme and "base64" are case-insensitive (RFC 2397)
        head, comma, data = data.partition(",")
        if not comma or not head.lower().endswith(";base64"):
            raise InvalidRequest(
                f"Invalid '{param}': a data: URL must hold base64 ('data:image/png;base64,...').",
                param=param,
                code="invalid_image",
            )
    data = "".join(data.split())  # base64 wrapped over lines is still base64
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(
            f"Invalid '{param}': not base64.", param=param, code="invalid_image"
        ) from None
    try:
        with Image.open(io.BytesIO(raw)) as image:
            kind, (width, height) = image.format, image.size
            if _quarter_turned(image):  # the worker turns it upright
                width, height = height, width
    except Image.DecompressionBombError:  # a size so big Pillow will not even read it
        raise InvalidRequest(
            f"Invalid '{param}': over {MAX_EDIT_PIXELS:,} pixels.",
            param=param,
            code="invalid_image",
        ) from None
    except (UnidentifiedImageError, OSError):
        kind, width, height = None, 0, 0
    if kind not in EDIT_FORMATS:
        raise InvalidRequest(
            f"Invalid '{param}': not an image Hearth can read; send a PNG, JPEG or WebP file.",
            param=param,
            code="invalid_image",
        )
    if width * height > MAX_EDIT_PIXELS:
        raise InvalidRequest(
            f"Invalid '{param}': {width}x{height} is over {MAX_EDIT_PIXELS:,} pixels.",
            param=param,
            code="invalid_image",
        )
    return Picture(data, width, height)


def prepare_edit(
    body: ImageEditRequest,
    state: AppState,
    deadline_s: float,
    reply_to: str | None = None,
) -> Job:
    """Check ``body``, its image and its mask against the model's limits; the
    edit job to queue for it."""
    model_id, limits = _image_model(state, body.model)
    image = picture("image", body.image)
    mask = picture("mask", body.mask) if body.mask is not None else None
    if mask is not None and (mask.width, mask.height) != (image.width, image.height):
        raise InvalidRequest(
            f"Invalid 'mask': {mask.width}x{mask.height}; it must be the size of the image "
            f"({image.width}x{image.height}).",
            param="mask",
            code="invalid_value",
        )
    size = _size(body, limits)
    if size is None:  # the image's own size: it must be one the model makes
        shown = f"{image.width}x{image.height} (send 'size' to have it resized)"
        _fits(image.width, image.height, limits, "image", shown)
        size = image.width, image.height
    call = _call(body, limits)
    strength = body.strength if body.strength is not None else (0.8 if mask is None else 1.0)
    if int(call["steps"] * strength) < 1:
        raise InvalidRequest(
            f"Invalid 'strength': {strength:g} of {call['steps']} steps runs no denoising "
            "step; raise 'strength' or 'num_inference_steps'.",
            param="strength",
            code="invalid_value",
        )
    return Job(
        type=JobType.IMAGES_EDITS,
        model=model_id,
        input={
            **call,
            "width": size[0],
            "height": size[1],
            "strength": strength,
            "image": image.base64,
            "mask": mask.base64 if mask is not None else "",
        },
        deadline=time.time() + deadline_s,
        reply_to=reply_to,
    )


def _takes_text(annotation: Any) -> bool:
    """Whether a field of type ``annotation`` can hold text (str, a text Literal…)."""
    if annotation is str:
        return True
    if get_origin(annotation) is Literal:
        return any(isinstance(choice, str) for choice in get_args(annotation))
    return any(_takes_text(part) for part in get_args(annotation))


def _form_value(name: str, value: str) -> Any:
    """A form field's text as the JSON value its field takes: a number or a
    boolean parsed where the field holds no text (a value that does not parse
    stays text, and validation names the field)."""
    field = ImageEditRequest.model_fields.get(name)
    if field is None or _takes_text(field.annotation):
        return value
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return value


async def edit_request(request: Request) -> ImageEditRequest:
    """The multipart form of `POST /v1/images/edits`, validated as the JSON body
    of a queued edit is (the files in base64)."""
    content_type = request.headers.get("content-type", "").lower()
    if not content_type.startswith("multipart/form-data"):
        raise InvalidRequest(
            "This route takes multipart/form-data: the image (and mask) as files, "
            "the other fields as form fields.",
            code="invalid_body",
        )
    fields: dict[str, Any] = {}
    try:
        async with request.form(max_files=len(EDIT_FILES) + 1) as form:
            for name, value in form.multi_items():
                key = "image" if name == "image[]" else name  # the openai client's list form
                if key in fields:
                    why = "Hearth edits one image at a time" if key == "image" else "send it once"
                    raise InvalidRequest(
                        f"Invalid '{key}': sent more than once; {why}.",
                        param=key,
                        code="invalid_value",
                    )
                if isinstance(value, UploadFile):
                    if key not in EDIT_FILES:
                        raise InvalidRequest(
                            f"Invalid '{key}': a file, where only 'image' and 'mask' are files.",
                            param=key,
                            code="invalid_value",
                        )
                    content = await value.read()
                    if not content:
                        raise InvalidRequest(
                            f"Invalid '{key}': the file is empty.", param=key, code="invalid_image"
                        )
                    fields[key] = base64.b64encode(content).decode("ascii")
                elif key in EDIT_FILES:
                    raise InvalidRequest(
                        f"Invalid '{key}': send it as a file.", param=key, code="invalid_value"
                    )
                else:
                    fields[key] = _form_value(key, value)
    except HTTPException as exc:  # Starlette could not take the form apart
        if exc.status_code != 400:
            raise
        raise InvalidRequest(
            f"The multipart form could not be read: {exc.detail}", code="invalid_form"
        ) from None
    try:
        return ImageEditRequest.model_validate(fields)
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        raise RequestValidationError(errors) from None


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


def _form_schema() -> dict[str, Any]:
    """The edit form for the API docs: the JSON fields, the image and mask as files."""
    schema = ImageEditRequest.model_json_schema()
    properties = schema["properties"]
    properties["image"] = {**properties["image"], "description": "A PNG, JPEG or WebP file."}
    for name in EDIT_FILES:
        described = {key: properties[name][key] for key in ("title", "description")}
        properties[name] = {"type": "string", "format": "binary", **described}
    return {**schema, "title": "ImageEditForm"}


@router.post(
    "/v1/images/edits",
    response_model=ImageResponse,
    responses=WORK_ERRORS,
    summary="Edit an image",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": _form_schema()}},
        }
    },
)
async def edit_images(request: Request, state: StateDep) -> Response:
    """Redraw an image from a prompt (OpenAI's multipart shape).

    Without a `mask`, the whole image is redrawn, as far as `strength` says
    (image to image). With one, only the mask's fully transparent pixels are
    repainted; every other pixel is kept (inpainting). Both run on the warm
    components of the model's text-to-image pipeline. The same extensions as
    generations, and `strength`; `Prefer: respond-async` queues it as a job.
    """
    body = await edit_request(request)
    return await respond(state, request, body, partial(prepare_edit, body, state))
