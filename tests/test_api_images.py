"""`POST /v1/images/generations` with the demo pipelines, through Redis and a worker."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import redis
from PIL import Image

from models.schedulers import NOISE_SCHEDULERS
from tests.conftest import Stack
from workers.protocol import Keys

pytestmark = pytest.mark.integration

MODELS = ("demo-unet", "demo-dit")


def generate(client: httpx.Client, **body: Any) -> httpx.Response:
    request = {"prompt": "a lighthouse at dusk", "num_inference_steps": 4, **body}
    return client.post("/v1/images/generations", json=request)


def pixels(item: dict[str, Any]) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def images_of(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


@pytest.mark.parametrize("model", MODELS)
def test_generates_a_png_of_the_asked_size(client: httpx.Client, model: str) -> None:
    (item,) = images_of(generate(client, model=model, size="128x64", seed=5))
    assert pixels(item).shape == (64, 128, 3)
    assert item["seed"] == 5
    assert pixels(item).std() > 5  # not a flat image


@pytest.mark.parametrize("model", MODELS)
def test_same_seed_same_bytes_other_seed_other_image(client: httpx.Client, model: str) -> None:
    first = images_of(generate(client, model=model, seed=11))[0]["b64_json"]
    again = images_of(generate(client, model=model, seed=11))[0]["b64_json"]
    other = images_of(generate(client, model=model, seed=12))[0]["b64_json"]
    assert first == again
    assert first != other


def test_a_seed_is_chosen_and_reported_when_none_is_given(client: httpx.Client) -> None:
    (item,) = images_of(generate(client, model="demo-dit"))
    again = images_of(generate(client, model="demo-dit", seed=item["seed"]))[0]
    assert again["b64_json"] == item["b64_json"]


@pytest.mark.parametrize("model", MODELS)
def test_n_images_take_consecutive_seeds(client: httpx.Client, model: str) -> None:
    many = images_of(generate(client, model=model, n=3, seed=40))
    assert [item["seed"] for item in many] == [40, 41, 42]
    assert len({item["b64_json"] for item in many}) == 3
    alone = images_of(generate(client, model=model, seed=41))[0]
    assert many[1]["b64_json"] == alone["b64_json"]  # one call for three equals three calls


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("scheduler", sorted(NOISE_SCHEDULERS))
def test_every_scheduler_runs(client: httpx.Client, model: str, scheduler: str) -> None:
    (item,) = images_of(generate(client, model=model, scheduler=scheduler, seed=1))
    assert pixels(item).shape == (64, 64, 3)


def test_schedulers_change_the_image(client: httpx.Client) -> None:
    ddim = images_of(generate(client, model="demo-unet", scheduler="ddim", seed=3))[0]
    euler = images_of(generate(client, model="demo-unet", scheduler="euler_a", seed=3))[0]
    assert ddim["b64_json"] != euler["b64_json"]


def test_url_results_are_served_as_files(client: httpx.Client, stack: Stack) -> None:
    (item,) = images_of(generate(client, model="demo-dit", response_format="url", seed=2))
    assert "b64_json" not in item
    assert item["url"].startswith(f"{stack.url}/v1/files/file_")
    response = client.get(item["url"])
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    inline = images_of(generate(client, model="demo-dit", seed=2))[0]
    assert base64.b64decode(inline["b64_json"]) == response.content
    missing = client.get("/v1/files/file_0000")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "file_not_found"


def test_matching_requests_are_batched_and_each_equals_its_own(
    stack: Stack, redis_client: redis.Redis
) -> None:
    stats = Keys(stack.namespace).batch_sizes("demo-dit")
    redis_client.delete(stats)
    seeds = list(range(100, 112))

    def one(seed: int) -> str:
        with stack.client as http:
            item = images_of(generate(http, model="demo-dit", seed=seed, num_inference_steps=20))
            return str(item[0]["b64_json"])

    with ThreadPoolExecutor(max_workers=len(seeds)) as pool:
        together = list(pool.map(one, seeds))
    sizes = {int(size): int(count) for size, count in redis_client.hgetall(stats).items()}
    assert sum(size * count for size, count in sizes.items()) == len(seeds)
    assert max(sizes) > 1, f"no request was batched with another: {sizes}"
    for seed, image in zip(seeds, together, strict=True):
        assert one(seed) == image, f"seed {seed}: the batched image differs from the one alone"


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"size": "100x64"}, "size", "multiples of 8"),
        ({"size": "1024x1024"}, "size", "512"),
        ({"size": "32x32"}, "size", "64"),
        ({"size": "big"}, "size", "pattern"),
        ({"num_inference_steps": 151}, "num_inference_steps", "at most 150"),
        ({"num_inference_steps": 0}, "num_inference_steps", "greater than or equal to 1"),
        ({"guidance_scale": 31}, "guidance_scale", "at most 30"),
        ({"guidance_scale": -1}, "guidance_scale", "greater than or equal to 0"),
        ({"n": 11}, "n", "at most 10"),
        ({"n": 0}, "n", "greater than or equal to 1"),
        ({"scheduler": "warp"}, "scheduler", "ddim"),
        ({"scheduler": "flow_euler"}, "scheduler", "euler_a"),
        ({"prompt": "x" * 2001}, "prompt", "at most 2000"),
        ({"prompt": ""}, "prompt", "at least 1"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        ({"num_inference_stepz": 4}, "num_inference_stepz", "Extra inputs"),
        ({"response_format": "jpeg"}, "response_format", "b64_json"),
        # Numbers are numbers: no booleans, no strings of digits.
        ({"n": True}, "n", "valid integer"),
        ({"n": "2"}, "n", "valid integer"),
        ({"num_inference_steps": True}, "num_inference_steps", "valid integer"),
        ({"seed": True}, "seed", "valid integer"),
        ({"seed": "7"}, "seed", "valid integer"),
        ({"guidance_scale": True}, "guidance_scale", "valid number"),
        ({"guidance_scale": "7.5"}, "guidance_scale", "valid number"),
        # Fields named like FastAPI's request locations are fields like any other.
        ({"body": 1}, "body", "Extra inputs"),
        ({"query": 1}, "query", "Extra inputs"),
        # Image i takes seed + i: every one of them must be a seed a request may send.
        ({"seed": 2**63 - 2, "n": 3}, "seed", "at most 9223372036854775805"),
        # OpenAI's newer fields, where Hearth cannot do what they ask.
        ({"output_format": "jpeg"}, "output_format", "png"),
        ({"background": "transparent"}, "background", "opaque"),
        ({"stream": True}, "stream", "False"),
        ({"partial_images": 2}, "partial_images", "0"),
        ({"output_compression": 101}, "output_compression", "less than or equal to 100"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(
    client: httpx.Client, body: dict[str, Any], param: str, words: str
) -> None:
    error = error_of(generate(client, model="demo-unet", **body), 400)
    assert error["param"] == param
    assert error["code"] == "invalid_value"  # the schema's checks and the route's alike
    assert words in error["message"]


def test_a_whole_number_is_a_valid_guidance_scale(client: httpx.Client) -> None:
    assert images_of(generate(client, model="demo-dit", guidance_scale=3, seed=1))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("steps", [1, 3])
def test_pndm_needs_four_steps(client: httpx.Client, model: str, steps: int) -> None:
    # PNDMScheduler's Runge-Kutta warm-up takes 4 steps unless the model's
    # scheduler config skips it (the demo models' does not).
    error = error_of(
        generate(client, model=model, scheduler="pndm", num_inference_steps=steps), 400
    )
    assert error["param"] == "num_inference_steps"
    assert error["message"] == (
        f"Invalid 'num_inference_steps': {steps}; scheduler 'pndm' takes at least 4."
    )
    assert images_of(generate(client, model=model, scheduler="ddim", num_inference_steps=1))


# JSON's \u escapes can spell a lone UTF-16 surrogate: valid JSON, not valid text.
@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ('"prompt": "a", "negative_prompt": "\\ud800"', "negative_prompt"),
        ('"prompt": "a\\udc00"', "prompt"),
        ('"prompt": "a", "style": "\\udfff"', "style"),
        ('"prompt": "a", "\\ud800": 1', None),  # a field's name: no field to name
    ],
)
def test_a_lone_surrogate_is_a_400_naming_the_field(
    client: httpx.Client, fields: str, param: str | None
) -> None:
    content = '{"model": "demo-unet", "num_inference_steps": 2, ' + fields + "}"
    response = client.post(
        "/v1/images/generations",
        content=content.encode(),
        headers={"content-type": "application/json"},
        timeout=10,
    )
    error = error_of(response, 400)
    assert error["param"] == param
    assert error["code"] == "invalid_value"
    assert "unicode" in error["message"].lower()


def test_a_dit_needs_sizes_in_steps_of_its_patches(client: httpx.Client) -> None:
    # VAE factor 8 times patch size 2: a width of 72 suits the U-Net, not the DiT.
    assert images_of(generate(client, model="demo-unet", size="72x64"))
    error = error_of(generate(client, model="demo-dit", size="72x64"), 400)
    assert "multiples of 16" in error["message"]


def test_the_model_must_exist_and_make_images(client: httpx.Client) -> None:
    assert error_of(generate(client, model="nope"), 404)["code"] == "model_not_found"
    error = error_of(generate(client, model="all-minilm-l6-v2"), 400)
    assert error["code"] == "wrong_model_kind"
    error = error_of(client.post("/v1/embeddings", json={"model": "demo-dit", "input": "x"}), 400)
    assert error["param"] == "model"


def test_models_list_shows_image_models(client: httpx.Client) -> None:
    cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
    assert cards["demo-unet"]["kind"] == "image"
    assert cards["demo-dit"]["workers"]


def test_the_openai_client_generates_with_extensions(stack: Stack) -> None:
    oai = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    result = oai.images.generate(
        model="demo-unet",
        prompt="a red fox",
        n=2,
        size="64x64",  # type: ignore[arg-type]
        response_format="b64_json",
        extra_body={
            "seed": 9,
            "num_inference_steps": 4,
            "scheduler": "euler",
            "negative_prompt": "blur",
        },
    )
    assert result.data is not None and len(result.data) == 2
    assert result.data[0].b64_json != result.data[1].b64_json
    again = oai.images.generate(
        model="demo-unet",
        prompt="a red fox",
        size="64x64",  # type: ignore[arg-type]
        extra_body={
            "seed": 9,
            "num_inference_steps": 4,
            "scheduler": "euler",
            "negative_prompt": "blur",
        },
    )
    assert again.data is not None
    assert again.data[0].b64_json == result.data[0].b64_json  # n=2 or alone: the same bytes
    with pytest.raises(openai.BadRequestError):
        oai.images.generate(model="demo-unet", prompt="x", size="100x100")  # type: ignore[arg-type]
    # The fields of OpenAI's newer image models, where Hearth does what they ask anyway.
    newer = oai.images.generate(
        model="demo-unet",
        prompt="a red fox",
        size="64x64",  # type: ignore[arg-type]
        output_format="png",
        output_compression=100,
        background="opaque",
        moderation="auto",
        stream=False,
        partial_images=0,
        quality="auto",
        safety_identifier="user-1",
        extra_body={"seed": 9, "num_inference_steps": 4, "scheduler": "euler"},
    )
    assert newer.data is not None and newer.data[0].b64_json
    oai.close()
