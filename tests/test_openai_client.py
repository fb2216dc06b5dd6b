"""The official `openai` client works against Hearth unchanged."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import openai
import pytest

from tests.conftest import MODEL, Stack

pytestmark = pytest.mark.integration


@pytest.fixture
def oai(stack: Stack) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    yield client
    client.close()


def test_embeddings_create_with_defaults(oai: openai.OpenAI) -> None:
    # The client asks for base64 by default and decodes it itself.
    result = oai.embeddings.create(model=MODEL, input="Hello from the openai client")
    assert len(result.data) == 1
    vector = np.array(result.data[0].embedding)
    assert vector.shape == (384,)
    assert abs(np.linalg.norm(vector) - 1.0) < 1e-5
    assert result.usage.prompt_tokens > 0
    assert result.model == MODEL


def test_float_and_base64_agree(oai: openai.OpenAI) -> None:
    texts = ["first text", "second, longer text to embed"]
    as_float = oai.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    as_b64 = oai.embeddings.create(model=MODEL, input=texts)
    assert [d.index for d in as_float.data] == [0, 1]
    for a, b in zip(as_float.data, as_b64.data, strict=True):
        np.testing.assert_allclose(a.embedding, b.embedding, atol=1e-7)


def test_dimensions(oai: openai.OpenAI) -> None:
    result = oai.embeddings.create(model=MODEL, input="shorter please", dimensions=48)
    assert len(result.data[0].embedding) == 48


def test_models_list_and_retrieve(oai: openai.OpenAI) -> None:
    ids = [model.id for model in oai.models.list()]
    assert MODEL in ids
    card = oai.models.retrieve(MODEL)
    assert card.id == MODEL
    assert card.owned_by == "hearth"


def test_errors_raise_the_clients_own_exceptions(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        oai.embeddings.create(model="no-such-model", input="x")
    assert missing.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad:
        oai.embeddings.create(model=MODEL, input="x", dimensions=1000)
    assert bad.value.body["param"] == "dimensions"  # type: ignore[index]


def test_models_answer_to_their_aliases(oai: openai.OpenAI) -> None:
    texts = ["Hearth keeps models warm."]
    aliased = oai.embeddings.create(model="text-embedding-3-small", input=texts)
    direct = oai.embeddings.create(model="all-minilm-l6-v2", input=texts)
    assert aliased.model == "all-minilm-l6-v2"
    assert aliased.data[0].embedding == direct.data[0].embedding
    image = oai.images.generate(
        model="dall-e-2",
        prompt="a red fox",
        size="64x64",  # type: ignore[arg-type]
        extra_body={"seed": 4, "num_inference_steps": 4},
    )
    assert image.data is not None and image.data[0].b64_json
    card = oai.models.retrieve("dall-e-2")
    assert card.id == "demo-unet"
    listed = {model.id: model for model in oai.models.list()}
    assert "dall-e-2" not in listed  # one card per model, its aliases on it
    assert (listed["demo-unet"].model_extra or {})["aliases"] == ["dall-e-2"]
