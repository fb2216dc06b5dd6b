"""Request and response bodies, in OpenAI's shapes.

Requests are validated here, once; what passes is trusted further in.
Limits that depend on settings or on the model (how many inputs, how many
dimensions) are checked by the route, which knows both.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def _check_input(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if not value:
            raise ValueError("must be a non-empty string or a non-empty list of strings")
        for index, item in enumerate(value):
            if isinstance(item, int | list):
                raise ValueError(
                    "token arrays are not supported: send the text itself, as a string "
                    "or a list of strings"
                )
            if not isinstance(item, str):
                raise ValueError(f"item {index} is {type(item).__name__}, expected a string")
        return value
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
    model: str = Field(
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
        description="Keep only the first N dimensions, then rescale to unit length.",
    )
    user: str | None = Field(default=None, description="Accepted for compatibility; ignored.")

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


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hearth"
    kind: str = Field(description="What the model does: `embedding`.")
    dimension: int | None = Field(default=None, description="Length of one embedding.")
    max_tokens: int | None = Field(default=None, description="Longer inputs are truncated.")
    workers: list[str] = Field(description="Live workers holding the model warm.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
