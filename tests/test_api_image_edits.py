"""`POST /v1/images/edits` with the demo pipelines, through Redis and a worker:
image to image, inpainting, the multipart form, queued edits."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import redis
from PIL import Image, ImageOps

from models.schedulers import NOISE_SCHEDULERS
from tests.conftest import Stack
from tests.test_jobs import ended, events, submit, wait_until
from workers.protocol import Keys

pytestmark = pytest.mark.integration

FORM = {"model": "demo-unet", "prompt": "a red door", "num_inference_steps": "4", "seed": "3"}
BOX = (16, 16, 48, 40)  # left, top, right, bottom: the region a mask opens


def picture(width: int = 64, height: int = 64, shift: int = 0) -> bytes:
    """A PNG with structure: a gradient in each channel and a diagonal stripe."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack(
        [(x * 4 + shift) % 256, (y * 4) % 256, ((x + y) % 16 < 8) * 200 + shift % 50], axis=-1
    ).astype(np.uint8)
    return png(Image.fromarray(pixels, "RGB"))


def mask(width: int = 64, height: int = 64, box: tuple[int, int, int, int] | None = BOX) -> bytes:
    """A PNG mask, opaque but for ``box``, which is fully transparent (to edit)."""
    image = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    if box is not None:
        image.paste((0, 0, 0, 0), box)
    return png(image)


def png(image: Image.Image, kind: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return buffer.getvalue()


def edit(
    client: httpx.Client,
    image: bytes | None = None,
    with_mask: bytes | None = None,
    **fields: Any,
) -> httpx.Response:
    files = {"image": ("image.png", picture() if image is None else image, "image/png")}
    if with_mask is not None:
        files["mask"] = ("mask.png", with_mask, "image/png")
    data = {**FORM, **{name: str(value) for name, value in fields.items()}}
    return client.post("/v1/images/edits", data=data, files=files)


def pixels_of(response: httpx.Response) -> list[np.ndarray]:
    assert response.status_code == 200, response.text
    return [decode(item["b64_json"]) for item in response.json()["data"]]


def decode(b64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_the_openai_client_edits_an_image(stack: Stack) -> None:
    oai = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)

    def run(seed: int, image: bytes) -> list[str]:
        result = oai.images.edit(
            model="demo-unet",
            image=("photo.png", image, "image/png"),
            prompt="a red door",
            n=2,
            size="64x64",
            response_format="b64_json",
            extra_body={"seed": seed, "strength": 0.75, "num_inference_steps": 8},
        )
        assert result.data is not None and len(result.data) == 2
        return [item.b64_json or "" for item in result.data]

    first = run(5, picture())
    assert first[0] != first[1]  # seeds 5 and 6
    assert all(decode(item).shape == (64, 64, 3) for item in first)
    assert run(5, picture()) == first  # the same request, the same bytes
    assert run(6, picture())[0] == first[1]  # image i takes seed + i
    assert run(5, picture(shift=90))[0] != first[0]  # the image matters


def test_form_fields_are_read_as_their_fields_type(client: httpx.Client) -> None:
    # Text stays text however it looks; numbers and booleans are parsed.
    response = edit(client, negative_prompt="42", scheduler="euler", stream="false", n="2")
    assert len(pixels_of(response)) == 2
    files = {"image": ("image.png", picture(), "image/png")}
    twice = client.post("/v1/images/edits", data={**FORM, "prompt": ["a", "b"]}, files=files)
    assert error_of(twice)["param"] == "prompt"


def test_the_image_and_strength_shape_the_result(client: httpx.Client) -> None:
    base = pixels_of(edit(client, strength=0.5, num_inference_steps=8))[0]
    assert np.array_equal(base, pixels_of(edit(client, strength=0.5, num_inference_steps=8))[0])
    assert not np.array_equal(base, pixels_of(edit(client, strength=1.0, num_inference_steps=8))[0])
    assert not np.array_equal(base, pixels_of(edit(client, picture(shift=90), strength=0.5))[0])


def test_a_mask_repaints_its_transparent_pixels_and_keeps_the_rest(client: httpx.Client) -> None:
    sent = np.asarray(Image.open(io.BytesIO(picture())).convert("RGB"), dtype=np.int16)
    for made in pixels_of(edit(client, with_mask=mask(), n=2)):
        inside = np.zeros(sent.shape[:2], dtype=bool)
        left, top, right, bottom = BOX
        inside[top:bottom, left:right] = True
        assert np.array_equal(made[~inside], sent[~inside])  # every pixel outside, as sent
        assert np.abs(made[inside] - sent[inside]).mean() > 10  # repainted inside


def test_a_small_region_to_repaint_survives_resizing(client: httpx.Client) -> None:
    image = picture(512, 512)
    spot = Image.open(io.BytesIO(mask(512, 512, box=(1, 1, 3, 3))))
    (made,) = pixels_of(edit(client, image, with_mask=png(spot), size="64x64"))
    resized = (
        Image.open(io.BytesIO(image)).convert("RGB").resize((64, 64), Image.Resampling.LANCZOS)
    )
    sent = np.asarray(resized, dtype=np.int16)
    kept = outside((0, 0, 1, 1))  # the one pixel of 64x64 the spot falls in
    assert np.array_equal(made[kept], sent[kept])
    assert not np.array_equal(made[~kept], sent[~kept])


def test_the_image_is_resized_to_the_size_asked_for(client: httpx.Client) -> None:
    (made,) = pixels_of(edit(client, picture(48, 40), size="128x64"))
    assert made.shape == (64, 128, 3)
    (same,) = pixels_of(edit(client, picture(128, 64)))  # no size: the image's own
    assert same.shape == (64, 128, 3)


def outside(box: tuple[int, int, int, int] = BOX, width: int = 64, height: int = 64) -> np.ndarray:
    """Where a mask opening ``box`` keeps the image: True outside the box."""
    kept = np.ones((height, width), dtype=bool)
    left, top, right, bottom = box
    kept[top:bottom, left:right] = False
    return kept


def test_a_16_bit_greyscale_image_keeps_its_tones(client: httpx.Client) -> None:
    levels = np.asarray(Image.open(io.BytesIO(picture())).convert("L"), dtype=np.int16)
    deep = Image.frombytes("I;16", (64, 64), (levels.astype("<u2") * 257).tobytes())
    (made,) = pixels_of(edit(client, png(deep), with_mask=mask()))
    assert np.abs(made[outside()] - levels[outside(), None]).max() <= 1


def test_an_exif_orientation_is_applied_as_browsers_show_it(client: httpx.Client) -> None:
    stored = Image.open(io.BytesIO(picture(64, 128)))
    exif = stored.getexif()
    exif[0x0112] = 6  # shown turned a quarter clockwise: 128 wide, 64 high
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", exif=exif)
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue())))
    sent = np.asarray(shown.convert("RGB"), dtype=np.int16)
    (made,) = pixels_of(edit(client, buffer.getvalue(), with_mask=mask(128, 64)))
    assert made.shape == (64, 128, 3)
    kept = outside(width=128, height=64)
    assert np.array_equal(made[kept], sent[kept])


def test_jpeg_and_webp_images_are_taken(client: httpx.Client) -> None:
    source = Image.open(io.BytesIO(picture()))
    for kind in ("JPEG", "WEBP"):
        (made,) = pixels_of(edit(client, png(source, kind)))
        assert made.shape == (64, 64, 3)


@pytest.mark.parametrize("scheduler", sorted(NOISE_SCHEDULERS))
def test_every_scheduler_edits(client: httpx.Client, scheduler: str) -> None:
    for with_mask in (None, mask()):
        (made,) = pixels_of(
            edit(client, with_mask=with_mask, scheduler=scheduler, num_inference_steps=8)
        )
        assert made.shape == (64, 64, 3)


def error_of(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    return error


@pytest.mark.parametrize(
    ("files", "fields", "param"),
    [
        ({"image": b"not an image"}, {}, "image"),
        ({"mask": mask()}, {}, "image"),  # no image
        ({"image": picture(), "mask": mask(32, 32)}, {}, "mask"),
        ({"image": picture(), "mask": b"GIF89a"}, {}, "mask"),
        ({"image": picture(60, 64)}, {}, "image"),  # its own size is no multiple of 8
        ({"image": picture()}, {"size": "65x64"}, "size"),
        ({"image": picture()}, {"strength": "0"}, "strength"),
        ({"image": picture()}, {"strength": "1.5"}, "strength"),
        ({"image": picture()}, {"strength": "high"}, "strength"),
        ({"image": picture()}, {"strength": "0.2", "num_inference_steps": "4"}, "strength"),
        ({"image": picture()}, {"n": "two"}, "n"),
        ({"image": picture()}, {"n": "11"}, "n"),
        ({"image": picture()}, {"scheduler": "nope"}, "scheduler"),
        ({"image": picture()}, {"prompt": ""}, "prompt"),
        ({"image": picture()}, {"colour": "red"}, "colour"),
        ({"image": picture()}, {"model": "all-minilm-l6-v2"}, "model"),
    ],
)
def test_bad_edits_are_a_400_naming_the_field(
    client: httpx.Client, files: dict[str, bytes], fields: dict[str, str], param: str
) -> None:
    upload = {name: (f"{name}.png", content, "image/png") for name, content in files.items()}
    response = client.post("/v1/images/edits", data={**FORM, **fields}, files=upload)
    assert error_of(response)["param"] == param


def png_header(width: int, height: int) -> bytes:
    """A PNG that says it is ``width`` x ``height``, with hardly any pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    pixels = chunk(b"IDAT", zlib.compress(bytes(16)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


@pytest.mark.parametrize("size", [(4096, 4097), (100_000, 100_000)])
def test_an_image_over_the_pixel_limit_is_refused_as_such(
    client: httpx.Client, size: tuple[int, int]
) -> None:
    error = error_of(edit(client, png_header(*size), size="64x64"))
    assert error["param"] == "image"
    assert "16,777,216 pixels" in error["message"]


@pytest.mark.parametrize("name", ["image", "mask"])
def test_an_empty_file_is_refused_as_empty(client: httpx.Client, name: str) -> None:
    files = {"image": picture(), "mask": mask(), name: b""}
    upload = {part: (f"{part}.png", content, "image/png") for part, content in files.items()}
    error = error_of(client.post("/v1/images/edits", data=FORM, files=upload))
    assert error["param"] == name
    assert "empty" in error["message"]


def test_an_opaque_mask_leaves_nothing_to_edit(client: httpx.Client) -> None:
    error = error_of(edit(client, with_mask=mask(box=None)))
    assert error["param"] == "mask"
    assert "transparent" in error["message"]
    assert error["code"] == "invalid_image"  # an image fault, as the API's own checks say


def test_one_image_at_a_time(client: httpx.Client) -> None:
    files = [("image[]", ("a.png", picture(), "image/png")) for _ in range(2)]
    assert error_of(client.post("/v1/images/edits", data=FORM, files=files))["param"] == "image"


def test_a_form_that_cannot_be_read_says_so(client: httpx.Client) -> None:
    files = [(f"file{i}", (f"{i}.png", picture(), "image/png")) for i in range(4)]
    error = error_of(client.post("/v1/images/edits", data=FORM, files=files))
    assert error["code"] == "invalid_form"
    assert "Too many files" in error["message"]
    upload = {"image": ("image.png", picture(), "image/png")}
    huge = client.post("/v1/images/edits", data={**FORM, "prompt": "x" * 1_100_000}, files=upload)
    error = error_of(huge)
    assert error["code"] == "invalid_form"
    assert "maximum size" in error["message"]


def test_a_json_body_is_refused_saying_what_the_route_takes(client: httpx.Client) -> None:
    error = error_of(client.post("/v1/images/edits", json={**FORM, "image": "aGk="}))
    assert "multipart/form-data" in error["message"]


def test_a_model_with_no_edit_pipeline_says_so(client: httpx.Client) -> None:
    error = error_of(edit(client, model="demo-dit"))
    assert error["param"] == "model"
    assert "cannot edit" in error["message"]
    assert error["code"] == "invalid_for_model"


def test_an_edit_queued_as_a_job_reports_its_steps(client: httpx.Client) -> None:
    encoded = base64.b64encode(picture()).decode()
    body = {
        "model": "demo-unet",
        "prompt": "a red door",
        "image": encoded,
        "mask": "data:image/png;base64," + base64.b64encode(mask()).decode(),
        "num_inference_steps": 10,
        "strength": 0.5,
        "seed": 3,
    }
    job = submit(client, "images.edits", body)
    assert job["type"] == "images.edits"
    received = events(client, job["id"])
    progress = [data for name, data in received if name == "progress"]
    assert progress[-1] == {"step": 5, "total": 5}  # 10 steps at strength 0.5
    done = wait_until(client, job["id"], ended)
    assert done["status"] == "succeeded"
    sync = edit(client, with_mask=mask(), num_inference_steps=10, strength=0.5).json()
    assert done["result"]["data"][0]["b64_json"] == sync["data"][0]["b64_json"]


def test_an_edit_that_fails_leaves_its_batch_run_once(
    client: httpx.Client, stack: Stack, redis_client: redis.Redis
) -> None:
    # A long demo-dit job holds the worker while the demo-unet jobs queue, so
    # they are taken as one batch: two generations that share a call, and an
    # edit whose mask leaves nothing to edit.
    slow = {"model": "demo-dit", "prompt": "a slow one", "size": "512x512"}
    blocker = submit(client, "images.generations", {**slow, "num_inference_steps": 150})
    wait_until(client, blocker["id"], lambda job: job["status"] == "running")
    stats = Keys(stack.namespace).batch_sizes("demo-unet")
    redis_client.delete(stats)
    body = {"model": "demo-unet", "prompt": "a red door", "num_inference_steps": 4}
    generations = [submit(client, "images.generations", {**body, "seed": seed}) for seed in (1, 2)]
    encoded = {
        name: base64.b64encode(content).decode()
        for name, content in {"image": picture(), "mask": mask(box=None)}.items()
    }
    failing = submit(client, "images.edits", {**body, **encoded})
    assert client.delete(f"/v1/jobs/{blocker['id']}").status_code == 200
    for job in generations:
        assert wait_until(client, job["id"], ended)["status"] == "succeeded"
    failed = wait_until(client, failing["id"], ended)
    assert failed["status"] == "failed"
    assert failed["error"]["param"] == "mask"
    assert failed["error"]["code"] == "invalid_image"  # a queued job's error has its code too
    # One call made both images, and nothing ran again.
    assert redis_client.hgetall(stats) == {b"2": b"1"}


@pytest.mark.parametrize("scheduler", ["heun", "pndm"])
def test_progress_never_passes_its_total(client: httpx.Client, scheduler: str) -> None:
    # These run more denoising steps than num_inference_steps * strength.
    encoded = {
        name: base64.b64encode(content).decode()
        for name, content in {"image": picture(), "mask": mask()}.items()
    }
    for files in ({"image": encoded["image"]}, encoded):
        body = {"model": "demo-unet", "prompt": "a red door", "num_inference_steps": 8, **files}
        body.update(strength=0.5, scheduler=scheduler)
        job = submit(client, "images.edits", body)
        progress = [data for name, data in events(client, job["id"]) if name == "progress"]
        assert all(item["step"] <= item["total"] for item in progress), progress
        done = wait_until(client, job["id"], ended)
        assert done["status"] == "succeeded"
        assert done["progress"]["step"] == done["progress"]["total"]


@pytest.mark.parametrize("prefix", ["data:image/png;base64,", "DATA:image/png;BASE64,"])
def test_a_queued_edit_takes_a_data_url(client: httpx.Client, prefix: str) -> None:
    image = prefix + base64.b64encode(picture()).decode()
    body = {"model": "demo-unet", "prompt": "a red door", "image": image, "num_inference_steps": 2}
    job = submit(client, "images.edits", body)
    assert wait_until(client, job["id"], ended)["status"] == "succeeded"


def test_a_queued_edit_names_the_field_within_input(client: httpx.Client) -> None:
    body = {"model": "demo-unet", "prompt": "a red door", "image": "not base64!"}
    response = client.post("/v1/jobs", json={"type": "images.edits", "input": body})
    assert error_of(response)["param"] == "input.image"


def test_prefer_respond_async_on_the_edit_route(client: httpx.Client) -> None:
    files = {"image": ("image.png", picture(), "image/png")}
    response = client.post(
        "/v1/images/edits", data=FORM, files=files, headers={"Prefer": "respond-async"}
    )
    assert response.status_code == 202, response.text
    done = wait_until(client, response.json()["id"], ended)
    assert done["status"] == "succeeded"
    assert len(done["result"]["data"]) == 1


def test_the_api_docs_describe_the_edit_form(client: httpx.Client) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/v1/images/edits"]["post"]
    schema = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert schema["properties"]["image"]["format"] == "binary"
    assert schema["properties"]["mask"]["format"] == "binary"
    assert {"image", "prompt", "model"} <= set(schema["required"])
    assert "strength" in schema["properties"]
