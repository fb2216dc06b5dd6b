"""A diffusers text-to-image folder's shape and the limits Hearth serves it with.

Read from JSON and YAML only (no torch, no diffusers), so the API can validate
sizes, steps and schedulers before a job is queued. Limits have defaults that
suit most models; a ``hearth.yaml`` in the model's folder overrides them::

    max_width: 512
    max_height: 512
    default_steps: 20
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.schedulers import min_steps, scheduler_choices
from models.st_config import UnsupportedModelError

LIMITS_FILE = "hearth.yaml"
DENOISERS = ("unet", "transformer", "prior")


class ImageLimits(BaseModel):
    """What requests a text-to-image model accepts, and what it does by default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size_step: int = Field(default=8, ge=1, description="width and height are multiples of this")
    min_size: int = Field(default=64, ge=8)
    max_width: int = Field(default=1024, ge=8)
    max_height: int = Field(default=1024, ge=8)
    default_width: int = Field(default=512, ge=8)
    default_height: int = Field(default=512, ge=8)
    max_steps: int = Field(default=150, ge=1)
    default_steps: int = Field(default=30, ge=1)
    max_guidance: float = Field(default=30.0, ge=0)
    default_guidance: float = Field(default=7.5, ge=0)
    max_n: int = Field(default=10, ge=1)
    max_prompt_chars: int = Field(default=2000, ge=1)
    default_scheduler: str = Field(default="", description="class name of the folder's scheduler")
    skip_prk_steps: bool = Field(
        default=False, description="the folder's scheduler config skips PNDM's warm-up"
    )

    @model_validator(mode="after")
    def _consistent(self) -> ImageLimits:
        for name in ("min_size", "max_width", "max_height", "default_width", "default_height"):
            if getattr(self, name) % self.size_step:
                raise ValueError(f"{name} must be a multiple of size_step ({self.size_step})")
        if not self.min_size <= self.default_width <= self.max_width:
            raise ValueError("default_width must lie between min_size and max_width")
        if not self.min_size <= self.default_height <= self.max_height:
            raise ValueError("default_height must lie between min_size and max_height")
        if self.default_steps > self.max_steps:
            raise ValueError("default_steps must not exceed max_steps")
        if self.default_guidance > self.max_guidance:
            raise ValueError("default_guidance must not exceed max_guidance")
        return self

    @property
    def schedulers(self) -> dict[str, str]:
        """Scheduler names this model accepts → diffusers class names."""
        return scheduler_choices(self.default_scheduler)

    def min_steps(self, scheduler_class: str) -> int:
        """The fewest steps ``scheduler_class``, built from this model's config, runs with."""
        return min_steps(scheduler_class, self.skip_prk_steps)


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as fh:
        data = json.load(fh)
    return data if isinstance(data, dict) else {}


def is_diffusers_folder(folder: Path) -> bool:
    index = _json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    return "vae" in index and any(name in index for name in DENOISERS)


def read_image_limits(folder: Path) -> ImageLimits:
    """Limits derived from the folder's components, then its ``hearth.yaml``."""
    index = _json(folder / "model_index.json")
    denoiser = next(name for name in DENOISERS if name in index)
    vae = _json(folder / "vae" / "config.json")
    blocks = vae.get("block_out_channels") or [0, 0, 0, 0]
    vae_factor = 2 ** (len(blocks) - 1)
    denoiser_config = _json(folder / denoiser / "config.json")
    step = vae_factor * int(denoiser_config.get("patch_size") or 1)
    sample = denoiser_config.get("sample_size")
    native = int(sample) * vae_factor if isinstance(sample, int) else 1024
    native = max(step, native - native % step)
    scheduler_config = _json(folder / "scheduler" / "scheduler_config.json")
    scheduler = str(scheduler_config.get("_class_name", ""))

    derived: dict[str, Any] = {
        "size_step": step,
        "min_size": max(64 - 64 % step, step),
        "max_width": max(1024 - 1024 % step, native),
        "max_height": max(1024 - 1024 % step, native),
        "default_width": native,
        "default_height": native,
        "default_scheduler": scheduler,
        # Schedulers are built from the model's own config, whichever is asked for.
        "skip_prk_steps": bool(scheduler_config.get("skip_prk_steps", False)),
    }
    overrides_file = folder / LIMITS_FILE
    if overrides_file.is_file():
        overrides = yaml.safe_load(overrides_file.read_text(encoding="utf-8")) or {}
        if not isinstance(overrides, dict):
            raise UnsupportedModelError(f"{overrides_file} must hold a mapping")
        derived.update(overrides)
    try:
        return ImageLimits(**derived)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UnsupportedModelError(f"{folder.name}: bad limits ({problems})") from None
