"""Text-to-image pipelines: any diffusers folder, loaded through diffusers'
own auto pipeline classes, with components shared through the cache; and the
image-to-image and inpainting pipelines built from their warm components."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import diffusers
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
)

from models import library_logs
from models.batch_invariance import make_batch_invariant
from models.components import NOT_SHARED, ComponentCache, ComponentKey
from models.device import Placement

logger = logging.getLogger(__name__)

# A diffusers pipeline (diffusers ships no type information for them).
Pipeline = Any


def _components(folder: Path) -> dict[str, str]:
    """Component name → class name, from the folder's model_index.json."""
    with (folder / "model_index.json").open(encoding="utf-8") as fh:
        index = json.load(fh)
    return {
        name: value[1]
        for name, value in index.items()
        if not name.startswith("_")
        and isinstance(value, list)
        and len(value) == 2
        and value[1] is not None
        and (folder / name).is_dir()
    }


def load_text_to_image(
    folder: Path, placement: Placement, cache: ComponentCache, batch_invariant: bool = True
) -> Pipeline:
    """Load ``folder`` as a text-to-image pipeline on ``placement``.

    Components already in ``cache`` (the same files, loaded by another model)
    are handed to diffusers instead of being loaded again; the rest are loaded
    from safetensors and added to the cache. With ``batch_invariant``, its
    images do not depend on what they are batched with
    (``models.batch_invariance``); a worker uses one value for all its models,
    so shared components agree.
    """
    library_logs.adopt("transformers", "diffusers")  # no "Loading pipeline components..." bar
    keys: dict[str, ComponentKey] = {
        name: ComponentCache.key(class_name, folder / name)
        for name, class_name in _components(folder).items()
        if name not in NOT_SHARED
    }
    shared = {name: cache.get(key) for name, key in keys.items() if cache.get(key) is not None}
    if shared:
        logger.info(
            "%s: sharing %s with models loaded before", folder.name, ", ".join(sorted(shared))
        )
    pipe: Pipeline = AutoPipelineForText2Image.from_pretrained(  # type: ignore[no-untyped-call]
        folder,
        dtype=placement.dtype,
        use_safetensors=True,
        local_files_only=True,
        **shared,
    )
    pipe.to(placement.device)
    pipe.set_progress_bar_config(disable=True)
    if batch_invariant:
        make_batch_invariant(pipe)
    for name, key in keys.items():
        cache.put(key, getattr(pipe, name))
    return pipe


def scheduler_class(class_name: str) -> Any:
    """The diffusers scheduler class called ``class_name``."""
    return getattr(diffusers, class_name)


def edit_pipeline(pipe: Pipeline, inpainting: bool) -> Pipeline | None:
    """The image-to-image (or, with ``inpainting``, the inpainting) pipeline made
    of ``pipe``'s own components, nothing loaded again; None where diffusers has
    no such pipeline for it."""
    auto = AutoPipelineForInpainting if inpainting else AutoPipelineForImage2Image
    try:
        derived: Pipeline = auto.from_pipe(pipe)
    except ValueError:  # "AutoPipeline can't find a pipeline linked to ..."
        return None
    derived.set_progress_bar_config(disable=True)
    return derived
