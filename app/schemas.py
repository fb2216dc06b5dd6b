"""Request and response bodies, in OpenAI's shapes.

Requests are validated here, once; what passes is trusted further in.
Limits that depend on settings or on the model (how many inputs, how many
dimensions) are checked by the route, which knows both.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    HttpUrl,
    TypeAdapter,
    ValidationInfo,
    field_validator,
)


def _unicode(value: str) -> str:
    # JSON's \uXXXX escapes can spell a lone UTF-16 surrogate, which Python
    # keeps in a str but no UTF-8 encoder (orjson, Redis, a tokenizer) accepts.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"character {exc.start} is a lone UTF-16 surrogate "
            f"({ascii(value[exc.start])[1:-1]}); send valid Unicode text"
        ) from None
    return value


MAX_SEED = 2**63 - 1  # the largest seed torch.Generator.manual_seed takes

# A free-text field: any string that is valid Unicode.
Text = Annotated[str, AfterValidator(_unicode)]
_TEXTS = TypeAdapter(list[Text])


def _check_input(value: Any) -> Any:
    if isinstance(value, str):
        return _unicode(value)
    if isinstance(value, list):
        if not value:
            raise ValueError("must be a non-empty string or a non-empty list of strings")
        if any(isinstance(item, list) or type(item) is int for item in value):
            raise ValueError(
                "token arrays are not supported: send the text itself, as a string "
                "or a list of strings"
            )
        # Raised from here, the errors keep their item's index: 'input[3]'.
        return _TEXTS.validate_python(value, strict=True)
    raise ValueError(f"expected a string or a list of strings, got {type(value).__name__}")


EmbeddingInput = Annotated[
    str | list[str],
    BeforeValidator(_check_input),
    Field(
        description="The text to embed: one string, or a list of strings embedded in one call.",
        examples=["The food was delicious and the waiter was kind."],
    ),
]


class EmbeddingRequest(BaseModel):
    """`POST /v1/embeddings`, as OpenAI defines it."""

    model_config = ConfigDict(extra="ignore")

    input: EmbeddingInput
    model: Text = Field(
        description="A model id from `GET /v1/models`.", examples=["all-minilm-l6-v2"]
    )
    encoding_format: Literal["float", "base64"] = Field(
        default="float",
        description="`float`: lists of numbers. "
        "`base64`: little-endian float32 bytes, base64-encoded.",
    )
    dimensions: int | None = Field(
        default=None,
        ge=1,
        strict=True,
        description="Keep only the first N dimensions, then rescale to unit length.",
    )
    user: Text | None = Field(default=None, description="Accepted for compatibility; ignored.")

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


# The error answers a route that queues work can give, for the OpenAPI document.
WORK_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 404, 500, 503, 504)
}


SIZE_PATTERN = r"^(auto|[1-9][0-9]{0,4}x[1-9][0-9]{0,4})$"


class ImageGenerationRequest(BaseModel):
    """`POST /v1/images/generations`: OpenAI's fields, plus Hearth's extensions."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(
        min_length=1, description="What to draw.", examples=["a lighthouse at dusk"]
    )
    model: Text = Field(
        description="An image model id from `GET /v1/models`.", examples=["demo-unet"]
    )
    n: int = Field(
        default=1, ge=1, strict=True, description="How many images (each gets seed, seed+1, …)."
    )
    size: str | None = Field(
        default=None,
        pattern=SIZE_PATTERN,
        description='"WIDTHxHEIGHT", e.g. "512x512", or "auto" for the model\'s own size.',
    )
    response_format: Literal["b64_json", "url"] = Field(
        default="b64_json",
        description="`b64_json`: the PNG inline. `url`: a link to `GET /v1/files/{id}`.",
    )
    negative_prompt: Text | None = Field(default=None, description="What to steer away from.")
    num_inference_steps: int | None = Field(
        default=None, ge=1, strict=True, description="Denoising steps."
    )
    guidance_scale: float | None = Field(
        default=None, ge=0, strict=True, description="Classifier-free guidance strength."
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        strict=True,
        le=MAX_SEED,
        description="Same request and seed, same image. Unset: a random seed, reported back.",
    )
    scheduler: Text | None = Field(
        default=None, description="A scheduler name (e.g. `ddim`, `euler_a`, `dpmpp_2m`)."
    )
    quality: Text | None = Field(default=None, description="Accepted for compatibility; ignored.")
    style: Text | None = Field(default=None, description="Accepted for compatibility; ignored.")
    user: Text | None = Field(default=None, description="Accepted for compatibility; ignored.")
    safety_identifier: Text | None = Field(
        default=None, description="Accepted for compatibility; ignored."
    )
    # Fields of OpenAI's newer image models: accepted where Hearth does what they
    # ask anyway, refused (naming the field) where it cannot.
    output_format: Literal["png"] | None = Field(
        default=None, description="`png`, the only format Hearth writes."
    )
    output_compression: int | None = Field(
        default=None,
        ge=0,
        le=100,
        strict=True,
        description="Accepted for compatibility; PNG is lossless, so it changes nothing.",
    )
    background: Literal["auto", "opaque"] | None = Field(
        default=None, description="Accepted for compatibility: every image is opaque."
    )
    moderation: Literal["auto", "low"] | None = Field(
        default=None, description="Accepted for compatibility; ignored."
    )
    stream: Literal[False] | None = Field(
        default=None,
        description="Streamed images are not offered; a queued job's progress streams from "
        "`GET /v1/jobs/{id}/events`.",
    )
    partial_images: Literal[0] | None = Field(
        default=None, description="Accepted for compatibility; only 0 (no stream)."
    )

    @field_validator("seed")
    @classmethod
    def _seeds_in_range(cls, seed: int | None, info: ValidationInfo) -> int | None:
        # Image i uses seed + i, itself a seed a request may send.
        n = info.data.get("n", 1)
        if seed is not None and seed + n - 1 > MAX_SEED:
            raise ValueError(f"with n={n}, seed must be at most {MAX_SEED - n + 1}")
        return seed


class ImageEditRequest(ImageGenerationRequest):
    """`POST /v1/images/edits`: an image to change, and where (OpenAI's fields,
    plus Hearth's extensions). The route takes them as multipart form fields
    and files; a queued job (`POST /v1/jobs`) as JSON, the files in base64."""

    image: str = Field(
        min_length=1,
        description="The image to edit (PNG, JPEG or WebP): a file in the form; base64 "
        "(or a `data:` URL) in a queued job's JSON.",
    )
    mask: str | None = Field(
        default=None,
        description="Where to edit: an image of the same size whose fully transparent "
        "pixels are repainted; the rest of the image is kept as it is. Without a mask, "
        "the whole image is redrawn, as much as `strength` says.",
    )
    strength: float | None = Field(
        default=None,
        gt=0,
        le=1,
        strict=True,
        description="How far from the image to go: 0 keeps it, 1 ignores it. "
        "Runs `num_inference_steps` * `strength` denoising steps. Default 0.8 without "
        "a mask, 1.0 with one.",
    )
    input_fidelity: Literal["high", "low"] | None = Field(
        default=None, description="Accepted for compatibility; `strength` sets how close to stay."
    )


class Image(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int = Field(description="The seed this image was generated with.")


class ImageResponse(BaseModel):
    created: int
    data: list[Image]


class _QueuedJob(BaseModel):
    model_config = ConfigDict(extra="forbid")

    webhook: HttpUrl | None = Field(
        default=None, description="Told of the job's end by a signed POST of the job."
    )


class EmbeddingsJob(_QueuedJob):
    """A queued `POST /v1/embeddings`."""

    type: Literal["embeddings"]
    input: EmbeddingRequest = Field(description="The body `POST /v1/embeddings` takes.")


class ImagesJob(_QueuedJob):
    """A queued `POST /v1/images/generations`."""

    type: Literal["images.generations"]
    input: ImageGenerationRequest = Field(
        description="The body `POST /v1/images/generations` takes."
    )


class ImageEditsJob(_QueuedJob):
    """A queued `POST /v1/images/edits`, its files in base64."""

    type: Literal["images.edits"]
    input: ImageEditRequest = Field(
        description="The fields `POST /v1/images/edits` takes, `image` and `mask` in base64."
    )


# `POST /v1/jobs`: a route's body, queued; the answer comes later. `type` says which.
JobRequest = Annotated[EmbeddingsJob | ImagesJob | ImageEditsJob, Field(discriminator="type")]
JOB_TYPES = ("embeddings", "images.generations", "images.edits")


class Progress(BaseModel):
    step: int
    total: int


class JobView(BaseModel):
    id: str
    object: Literal["job"] = "job"
    type: str
    model: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled", "expired"]
    progress: Progress | None = None
    attempts: int
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    webhook: str | None = None
    error: ErrorDetail | None = None
    result: dict[str, Any] | None = Field(
        default=None, description="When succeeded: the body the synchronous route answers."
    )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hearth"
    kind: str = Field(description="What the model does: `embedding` or `image`.")
    dimension: int | None = Field(default=None, description="Length of one embedding.")
    max_tokens: int | None = Field(default=None, description="Longer inputs are truncated.")
    workers: list[str] = Field(description="Live workers holding the model warm.")
    aliases: list[str] = Field(
        default_factory=list,
        description="Other ids requests may name the model by (the store's models.yaml).",
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
