"""Runs text-to-image jobs on a warm diffusers pipeline.

Jobs that can share one pipeline call (same size, steps, guidance and
scheduler) run together, one generator per image, so each image equals what
its request gives alone. Each call gets a fresh scheduler built from the
pipeline's own config; the step callback reports progress and interrupts the
call once every job in it is cancelled.
"""

from __future__ import annotations

import base64
import inspect
import io
import logging
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import orjson
import torch

from models.diffusion import Pipeline, scheduler_class
from workers.hooks import BatchHooks
from workers.protocol import InvalidJobInput, Job, JobError, JobStatus, Outcome

logger = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.05  # at most this often per call, besides the first and last step


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


class ImageRunner:
    def __init__(self, model_id: str, pipe: Pipeline, max_batch_images: int) -> None:
        self.model_id = model_id
        self.pipe = pipe
        self.max_batch_images = max_batch_images
        self._scheduler_config = pipe.scheduler.config
        self._own_scheduler = type(pipe.scheduler)
        accepted = inspect.signature(pipe.__call__).parameters
        self._takes_negative = "negative_prompt" in accepted
        # Newer pipelines call callback_on_step_end(pipe, step, timestep, tensors) and
        # honour pipe._interrupt; older ones (PixArt) call callback(step, timestep, latents).
        self._step_end_callback = "callback_on_step_end" in accepted
        if not self._step_end_callback and "callback" not in accepted:
            raise ValueError(f"{type(pipe).__name__} reports no steps: Hearth cannot follow it")
        # Hearth validates sizes itself: no silent resizing, no caption rewriting.
        self._extra = {
            name: False for name in ("use_resolution_binning", "clean_caption") if name in accepted
        }

    def run(self, jobs: list[Job], hooks: BatchHooks) -> tuple[list[Outcome], list[int]]:
        """Outcomes in the order of ``jobs``, and the images per pipeline call."""
        groups: dict[CallShape, list[Job]] = defaultdict(list)
        for job in jobs:
            groups[call_shape(job)].append(job)
        outcomes: dict[str, Outcome] = {}
        sizes: list[int] = []
        for shape, group in groups.items():
            for chunk in self._chunks(group):
                outcomes.update(self._call(shape, chunk, hooks))
                sizes.append(sum(int(job.input["n"]) for job in chunk))
        return [outcomes[job.id] for job in jobs], sizes

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

    def _call(self, shape: CallShape, jobs: list[Job], hooks: BatchHooks) -> dict[str, Outcome]:
        prompts: list[str] = []
        negatives: list[str] = []
        generators: list[torch.Generator] = []
        for job in jobs:
            negative = job.input.get("negative_prompt") or ""
            if negative and not self._takes_negative:
                raise InvalidJobInput(f"model {self.model_id} does not take a negative_prompt")
            for index in range(int(job.input["n"])):
                prompts.append(job.input["prompt"])
                negatives.append(negative)
                # CPU generators: the same seed gives the same image on any device.
                generators.append(
                    torch.Generator("cpu").manual_seed(int(job.input["seed"]) + index)
                )

        ids = [job.id for job in jobs]
        last_report = [0.0]

        def after_step(step: int) -> bool:
            """Report progress; True when every job of the call is cancelled."""
            done = step + 1
            now = time.monotonic()
            if done in (1, shape.steps) or now - last_report[0] >= PROGRESS_EVERY_S:
                hooks.progress(ids, done, shape.steps)
                last_report[0] = now
            return all(hooks.cancelled(job_id) for job_id in ids)

        def on_step_end(pipe: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> Any:
            if after_step(step):
                pipe._interrupt = True  # diffusers' own way to stop at the next step
            return tensors

        def on_step(step: int, _timestep: Any, _latents: Any) -> None:
            if after_step(step):
                raise CallCancelled  # older pipelines have no interrupt: leave the loop

        scheduler = scheduler_class(shape.scheduler) if shape.scheduler else self._own_scheduler
        self.pipe.scheduler = scheduler.from_config(self._scheduler_config)
        kwargs: dict[str, Any] = dict(self._extra)
        if self._takes_negative:
            kwargs["negative_prompt"] = negatives
        if self._step_end_callback:
            kwargs["callback_on_step_end"] = on_step_end
        else:
            kwargs.update(callback=on_step, callback_steps=1)
        try:
            images = self.pipe(
                prompt=prompts,
                width=shape.width,
                height=shape.height,
                num_inference_steps=shape.steps,
                guidance_scale=shape.guidance,
                generator=generators,
                output_type="pil",
                **kwargs,
            ).images
        except CallCancelled:
            images = [None] * len(prompts)

        outcomes: dict[str, Outcome] = {}
        start = 0
        for job in jobs:
            n = int(job.input["n"])
            if hooks.cancelled(job.id):
                outcomes[job.id] = Outcome(
                    JobStatus.CANCELLED, error=JobError("cancelled by the client", "cancelled")
                )
            else:
                outcomes[job.id] = self._outcome(job, images[start : start + n])
            start += n
        return outcomes

    def _outcome(self, job: Job, images: list[Any]) -> Outcome:
        seed = int(job.input["seed"])
        data: list[dict[str, Any]] = []
        files: dict[str, bytes] = {}
        for index, image in enumerate(images):
            encoded = png(image)
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
