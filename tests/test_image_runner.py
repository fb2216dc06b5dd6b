"""The image runner's pipeline calls: an image is what its request gives alone,
whatever the runner's calls before it left in the scheduler they share."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from imagejob import image_input
from PIL import Image

from models.components import ComponentCache
from models.demo import DEMO_MODEL_IDS
from models.device import choose_placement
from models.diffusion import load_text_to_image
from models.schedulers import NOISE_SCHEDULERS
from tests.support import one_torch_thread
from workers.hooks import NoHooks
from workers.images import PARALLEL_PNG_PIXELS, ImageRunner, encode_all, png
from workers.protocol import Job, JobStatus, JobType, Outcome

# Several diffusers schedulers hand torch tensors to NumPy (np.array, np.log),
# whose __array__ and __array_wrap__ predate NumPy 2's new arguments; the
# worker's process runs them just the same.
pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
    ),
    pytest.mark.filterwarnings(
        "ignore:__array_wrap__ must accept context and return_scalar:DeprecationWarning"
    ),
]


@pytest.fixture(scope="module")
def pipes(demo_store: Path) -> Iterator[dict[str, Any]]:
    """The demo pipelines, run on one CPU thread."""
    cache, placement = ComponentCache(), choose_placement("cpu")
    loaded = {
        model: load_text_to_image(demo_store / model, placement, cache) for model in DEMO_MODEL_IDS
    }
    with one_torch_thread():
        yield loaded


def job(model: str, scheduler: str, seed: int, steps: int, n: int = 1) -> Job:
    """The job the API queues for ``n`` 64x64 images (the image benchmarks' input)."""
    return Job(
        type=JobType.IMAGES_GENERATIONS,
        model=model,
        input={**image_input(64, steps, seed, n), "scheduler": NOISE_SCHEDULERS[scheduler]},
        deadline=time.time() + 600,
    )


def edit(generation: Job, picture: str) -> Job:
    """``generation`` turned into an image-to-image edit of ``picture`` (base64 PNG)."""
    return replace(
        generation,
        type=JobType.IMAGES_EDITS,
        input={**generation.input, "image": picture, "mask": "", "strength": 0.5},
    )


class CancelledMidway(NoHooks):
    """Hooks that find the call's jobs cancelled from its second step on."""

    def __init__(self) -> None:
        self.asked = 0

    def cancelled(self, job_id: str) -> bool:
        self.asked += 1
        return self.asked >= 2


def images_of(outcome: Outcome) -> list[str]:
    assert outcome.status is JobStatus.SUCCEEDED
    assert outcome.result is not None
    return [item["b64_json"] for item in orjson.loads(outcome.result)["data"]]


def image(runner: ImageRunner, work: Job) -> str:
    (outcome,), _sizes = runner.run([work], NoHooks())
    (made,) = images_of(outcome)
    return made


@pytest.mark.parametrize("model", DEMO_MODEL_IDS)
@pytest.mark.parametrize("scheduler", sorted(NOISE_SCHEDULERS))
def test_an_image_is_the_same_after_calls_that_left_the_scheduler_midway(
    pipes: dict[str, Any], model: str, scheduler: str
) -> None:
    # A runner that never ran: its scheduler is new.
    alone = image(ImageRunner(model, pipes[model], 8), job(model, scheduler, seed=1, steps=4))

    runner = ImageRunner(model, pipes[model], 8)
    hooks = CancelledMidway()
    (cut,), _sizes = runner.run([job(model, scheduler, seed=2, steps=6)], hooks)
    assert cut.status is JobStatus.CANCELLED
    assert hooks.asked >= 2  # the call was left after its first step, its schedule half run
    # An edit starts its schedule partway (the scheduler's begin index), where
    # diffusers has an image-to-image pipeline for the model.
    (edited,), _sizes = runner.run([edit(job(model, scheduler, seed=4, steps=6), alone)], NoHooks())
    assert edited.status is (JobStatus.SUCCEEDED if model == "demo-unet" else JobStatus.FAILED)
    other = image(runner, job(model, scheduler, seed=3, steps=5))
    again = image(runner, job(model, scheduler, seed=1, steps=4))

    assert again == alone
    assert other != alone


def test_a_runner_keeps_one_scheduler_per_class(pipes: dict[str, Any]) -> None:
    runner = ImageRunner("demo-dit", pipes["demo-dit"], 8)
    image(runner, job("demo-dit", "euler", seed=1, steps=2))
    euler = pipes["demo-dit"].scheduler
    image(runner, job("demo-dit", "ddim", seed=1, steps=2))
    assert pipes["demo-dit"].scheduler is not euler
    image(runner, job("demo-dit", "euler", seed=1, steps=2))
    assert pipes["demo-dit"].scheduler is euler


class Cancelled(NoHooks):
    """Hooks that find the jobs of ``ids`` cancelled."""

    def __init__(self, *ids: str) -> None:
        self.ids = set(ids)

    def cancelled(self, job_id: str) -> bool:
        return job_id in self.ids


def test_the_images_of_one_call_come_back_in_order_each_as_made_alone(
    pipes: dict[str, Any],
) -> None:
    runner = ImageRunner("demo-dit", pipes["demo-dit"], 8)
    two, one, dropped = (
        job("demo-dit", "ddim", seed=10, steps=3, n=2),
        job("demo-dit", "ddim", seed=20, steps=3),
        job("demo-dit", "ddim", seed=30, steps=3),
    )
    outcomes, sizes = runner.run([two, dropped, one], Cancelled(dropped.id))
    assert sizes == [4]  # one call made every image, the cancelled job's too
    alone = [image(runner, job("demo-dit", "ddim", seed, steps=3)) for seed in (10, 11, 20)]
    assert images_of(outcomes[0]) == alone[:2]
    assert outcomes[1].status is JobStatus.CANCELLED
    assert images_of(outcomes[2]) == alone[2:]


def test_images_encoded_side_by_side_come_back_in_order() -> None:
    rng = np.random.default_rng(7)
    # The first takes longest: encodings handed back as they end would put it last.
    sizes = [512, 128, 128, 128, 64, 64]
    images = [Image.fromarray(rng.integers(0, 256, (n, n, 3), dtype=np.uint8)) for n in sizes]
    assert sum(image.width * image.height for image in images) >= PARALLEL_PNG_PIXELS
    assert encode_all(images) == [png(image) for image in images]
