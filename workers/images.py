"""Runs text-to-image and image-edit jobs on a warm diffusers pipeline.

Generations that can share one pipeline call (same size, steps, guidance and
scheduler) run together, one generator per image, so each image equals what
its request gives alone. Edits run on the image-to-image and inpainting
pipelines made of the same components, one request per call. Each scheduler
class a model runs with is built once from the pipeline's own config and kept
for its later calls; the step callback reports progress and interrupts the
call once every job in it is cancelled.
"""

from __future__ import annotations

import base64
import contextlib
import inspect
import io
import logging
import os
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import torch
from PIL import Image, ImageOps

from models.diffusion import Pipeline, edit_pipeline, scheduler_class
from workers.hooks import BatchHooks
from workers.protocol import InvalidJobInput, Job, JobError, JobStatus, JobType, Outcome

logger = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.05  # at most this often per call, besides the first and last step
SIXTEEN_BIT_GREY = ("I", "I;16", "I;16B", "I;16L")  # modes a 16-bit greyscale PNG opens in


class CallCancelled(Exception):
    """Raised from a step callback to leave a pipeline call whose jobs were all cancelled."""


@dataclass(frozen=True)
class CallShape:
    """What jobs must share to run in one pipeline call."""

    width: int
    height: int
    steps: int
    guidance: float
    scheduler: str  # diffusers class name; "" for the pipeline's own


def call_shape(job: Job) -> CallShape:
    params = job.input
    return CallShape(
        width=int(params["width"]),
        height=int(params["height"]),
        steps=int(params["steps"]),
        guidance=float(params["guidance"]),
        scheduler=str(params.get("scheduler") or ""),
    )


def png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# Pillow lets go of the interpreter while it compresses, so the images of one
# call are encoded side by side, up to one thread per core.
_ENCODERS = ThreadPoolExecutor(max_workers=_cores(), thread_name_prefix="png")
# The fewest pixels in all worth spreading over the encoding threads. A call of
# 8 demo-dit images on 2 cores, encoded side by side against one after the
# other (12 alternated calls each): 64x64 1.4 ms slower, 128x128 2.3 ms
# faster, 256x256 19.8 ms faster (of 935 ms); alone, 8 PNGs of 256x256 took
# 37 ms against 65. Just after a pipeline call its OpenMP threads still spin
# on the other cores, which small encodings cannot make up for.
PARALLEL_PNG_PIXELS = 8 * 128 * 128


def encode_all(images: list[Any]) -> list[bytes]:
    """Each image as PNG, in order; side by side on the encoding threads when
    there are enough pixels to make it pay."""
    pixels = sum(image.width * image.height for image in images)
    if len(images) < 2 or pixels < PARALLEL_PNG_PIXELS:
        return [png(image) for image in images]
    return list(_ENCODERS.map(png, images))


@dataclass(frozen=True)
class Target:
    """A pipeline, and how to call it."""

    pipe: Pipeline
    takes_negative: bool
    # Newer pipelines call callback_on_step_end(pipe, step, timestep, tensors) and
    # honour pipe._interrupt; older ones (PixArt) call callback(step, timestep, latents).
    step_end_callback: bool
    extra: dict[str, Any]  # arguments every call of it gets

    @classmethod
    def of(cls, pipe: Pipeline) -> Target:
        accepted = inspect.signature(pipe.__call__).parameters
        step_end_callback = "callback_on_step_end" in accepted
        if not step_end_callback and "callback" not in accepted:
            raise ValueError(f"{type(pipe).__name__} reports no steps: Hearth cannot follow it")
        # Hearth validates sizes itself: no silent resizing, no caption rewriting.
        extra = {
            name: False for name in ("use_resolution_binning", "clean_caption") if name in accepted
        }
        return cls(pipe, "negative_prompt" in accepted, step_end_callback, extra)


@dataclass(frozen=True)
class Edit:
    """What an edit job adds to a call: its image, its mask, how far to go."""

    image: Any  # PIL image, RGB, at the job's size
    mask: Any | None  # PIL image, L, at the job's size: 255 where to repaint
    strength: float

    def arguments(self, width: int, height: int) -> dict[str, Any]:
        if self.mask is None:
            return {"image": self.image, "strength": self.strength}
        return {
            "image": self.image,
            "mask_image": self.mask,
            "strength": self.strength,
            "width": width,
            "height": height,
        }

    def finish(self, made: Any) -> Any:
        """The image returned: outside the mask, every pixel is the one sent."""
        if self.mask is None:
            return made
        return Image.composite(made, self.image, self.mask)


def _picture(job: Job, param: str) -> Any:
    """The job's ``param`` image (base64), decoded, turned upright as its EXIF
    orientation says (as browsers show it, and as the API measured it)."""
    try:
        image: Image.Image = Image.open(io.BytesIO(base64.b64decode(job.input[param])))
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidJobInput(
            f"Invalid '{param}': the image cannot be read ({exc}).", param, "invalid_image"
        ) from None
    # EXIF that cannot be read turns nothing, in the API's measure too.
    with contextlib.suppress(SyntaxError, ValueError, OSError):
        image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_GREY:
        # Pillow's own conversion to 8 bits clips at 255: nearly every pixel would be white.
        return image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
    return image


def edit_of(job: Job) -> Edit:
    """Decode an edit job's image and mask, at the size it asks for."""
    size = (int(job.input["width"]), int(job.input["height"]))
    image = _picture(job, "image").convert("RGB")
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    mask = None
    if job.input.get("mask"):
        alpha = _picture(job, "mask").convert("RGBA").getchannel("A")
        # OpenAI's convention: fully transparent pixels are the ones to edit.
        mask = alpha.point(lambda value: 255 if value == 0 else 0)
        if mask.getbbox() is None:
            raise InvalidJobInput(
                "Invalid 'mask': it has no fully transparent pixel, so there is nothing to "
                "edit; make transparent the pixels to repaint.",
                "mask",
                "invalid_image",
            )
        if mask.size != size:
            # Sampled, a small region to repaint could fall between the samples and the
            # edit vanish: a pixel of the new size is repainted if any it covers was.
            covered = np.asarray(mask.convert("F").resize(size, Image.Resampling.BOX)) > 0
            mask = Image.fromarray(covered.astype(np.uint8) * 255, "L")
    return Edit(image=image, mask=mask, strength=float(job.input["strength"]))


class ImageRunner:
    def __init__(self, model_id: str, pipe: Pipeline, max_batch_images: int) -> None:
        self.model_id = model_id
        self.pipe = pipe
        self.max_batch_images = max_batch_images
        self._scheduler_config = pipe.scheduler.config
        self._own_scheduler = type(pipe.scheduler)
        self._schedulers: dict[Any, Any] = {}  # class → this model's one instance of it
        self._text_to_image = Target.of(pipe)
        self._editors: dict[bool, Target | None] = {}  # inpainting? → its pipeline

    def run(self, jobs: list[Job], hooks: BatchHooks) -> tuple[list[Outcome], list[int]]:
        """Outcomes in the order of ``jobs``, and the images per pipeline call.

        Generations that share a call shape run together; an edit runs alone
        (its image is its own).
        """
        groups: dict[CallShape, list[Job]] = defaultdict(list)
        edits: list[Job] = []
        for job in jobs:
            if job.type is JobType.IMAGES_EDITS:
                edits.append(job)
            else:
                groups[call_shape(job)].append(job)
        outcomes: dict[str, Outcome] = {}
        sizes: list[int] = []
        for shape, group in groups.items():
            for chunk in self._chunks(group):
                outcomes.update(self._call(shape, chunk, hooks))
                sizes.append(sum(int(job.input["n"]) for job in chunk))
        for job in edits:
            try:
                outcomes.update(self._call(call_shape(job), [job], hooks, edit_of(job)))
            except InvalidJobInput as exc:
                # Found before its pipeline runs: this edit fails alone, and the jobs
                # of the batch that ran already are not run again one by one.
                outcomes[job.id] = exc.outcome()
                continue
            sizes.append(int(job.input["n"]))
        return [outcomes[job.id] for job in jobs], sizes

    def _editor(self, inpainting: bool) -> Target:
        """The pipeline that edits with this model's warm components, made on first use."""
        if inpainting not in self._editors:
            derived = edit_pipeline(self.pipe, inpainting)
            self._editors[inpainting] = Target.of(derived) if derived is not None else None
        target = self._editors[inpainting]
        if target is None:
            what = "inpainting" if inpainting else "image-to-image"
            raise InvalidJobInput(
                f"Invalid 'model': {self.model_id} ({type(self.pipe).__name__}) cannot edit "
                f"images: diffusers has no {what} pipeline for it.",
                "model",
            )
        return target

    def _scheduler(self, kind: Any) -> Any:
        """This model's scheduler of class ``kind``, built from the pipeline's own
        config on first use.

        Kept across calls, as a diffusers pipeline keeps its own: every pipeline
        call starts by setting the scheduler's timesteps, which resets the state
        the call before left in it (its step index, its history of model
        outputs), even after a call that was interrupted. Building one per call
        took 0.65 ms. A scheduler is not safe to use from two threads at once;
        every call of a runner is made on one thread (the worker's inference
        thread), one after the other.
        """
        scheduler = self._schedulers.get(kind)
        if scheduler is None:
            scheduler = self._schedulers[kind] = kind.from_config(self._scheduler_config)
        return scheduler

    def _chunks(self, group: list[Job]) -> list[list[Job]]:
        """Split jobs so a call holds at most max_batch_images images (a bigger job runs alone)."""
        chunks: list[list[Job]] = []
        current: list[Job] = []
        images = 0
        for job in group:
            n = int(job.input["n"])
            if current and images + n > self.max_batch_images:
                chunks.append(current)
                current, images = [], 0
            current.append(job)
            images += n
        if current:
            chunks.append(current)
        return chunks

    def _call(
        self, shape: CallShape, jobs: list[Job], hooks: BatchHooks, edit: Edit | None = None
    ) -> dict[str, Outcome]:
        target = self._text_to_image if edit is None else self._editor(edit.mask is not None)
        prompts: list[str] = []
        negatives: list[str] = []
        generators: list[torch.Generator] = []
        for job in jobs:
            negative = job.input.get("negative_prompt") or ""
            if negative and not target.takes_negative:
                raise InvalidJobInput(
                    f"Invalid 'negative_prompt': model {self.model_id} does not take one.",
                    "negative_prompt",
                )
            for index in range(int(job.input["n"])):
                prompts.append(job.input["prompt"])
                negatives.append(negative)
                # CPU generators: the same seed gives the same image on any device.
                generators.append(
                    torch.Generator("cpu").manual_seed(int(job.input["seed"]) + index)
                )

        ids = [job.id for job in jobs]
        last_report = [0.0]
        # An edit runs the last steps * strength steps of the schedule (diffusers' rule).
        total = shape.steps if edit is None else min(int(shape.steps * edit.strength), shape.steps)

        def after_step(step: int, total: int) -> bool:
            """Report progress; True when every job of the call is cancelled."""
            done = step + 1
            now = time.monotonic()
            if done in (1, total) or now - last_report[0] >= PROGRESS_EVERY_S:
                hooks.progress(ids, done, total)
                last_report[0] = now
            return all(hooks.cancelled(job_id) for job_id in ids)

        def on_step_end(pipe: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> Any:
            # The pipeline's own count of its steps: a second-order scheduler (heun)
            # or PNDM's warm-up runs more than num_inference_steps * strength.
            if after_step(step, getattr(pipe, "num_timesteps", total)):
                pipe._interrupt = True  # diffusers' own way to stop at the next step
            return tensors

        def on_step(step: int, _timestep: Any, _latents: Any) -> None:
            if after_step(step, total):
                raise CallCancelled  # older pipelines have no interrupt: leave the loop

        kind = scheduler_class(shape.scheduler) if shape.scheduler else self._own_scheduler
        target.pipe.scheduler = self._scheduler(kind)
        kwargs: dict[str, Any] = dict(target.extra)
        if target.takes_negative:
            kwargs["negative_prompt"] = negatives
        if target.step_end_callback:
            kwargs["callback_on_step_end"] = on_step_end
        else:
            kwargs.update(callback=on_step, callback_steps=1)
        if edit is None:
            kwargs.update(width=shape.width, height=shape.height)
        else:
            kwargs.update(edit.arguments(shape.width, shape.height))
        try:
            images = target.pipe(
                prompt=prompts,
                num_inference_steps=shape.steps,
                guidance_scale=shape.guidance,
                generator=generators,
                output_type="pil",
                **kwargs,
            ).images
        except CallCancelled:
            images = [None] * len(prompts)
        if edit is not None:
            images = [edit.finish(image) if image is not None else None for image in images]

        outcomes: dict[str, Outcome] = {}
        kept: list[tuple[Job, list[Any]]] = []  # the jobs to answer, each with its images
        start = 0
        for job in jobs:
            n = int(job.input["n"])
            if hooks.cancelled(job.id):
                outcomes[job.id] = Outcome(
                    JobStatus.CANCELLED, error=JobError("cancelled by the client", "cancelled")
                )
            else:
                kept.append((job, images[start : start + n]))
            start += n
        encoded = iter(encode_all([image for _job, made in kept for image in made]))
        for job, made in kept:
            outcomes[job.id] = self._outcome(job, [next(encoded) for _image in made])
        return outcomes

    def _outcome(self, job: Job, pngs: list[bytes]) -> Outcome:
        seed = int(job.input["seed"])
        data: list[dict[str, Any]] = []
        files: dict[str, bytes] = {}
        for index, encoded in enumerate(pngs):
            item: dict[str, Any] = {"revised_prompt": None, "seed": seed + index}
            if job.input.get("response_format") == "url":
                file_id = f"file_{uuid.uuid4().hex}"
                files[file_id] = encoded
                item["url"] = f"/v1/files/{file_id}"
            else:
                item["b64_json"] = base64.b64encode(encoded).decode("ascii")
            data.append(item)
        body = orjson.dumps({"created": int(time.time()), "data": data})
        return Outcome(JobStatus.SUCCEEDED, result=body, files=files)
