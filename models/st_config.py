"""A sentence-transformers folder's own description of how to embed.

Read with plain JSON, without torch, so the API can learn a model's dimension
and limits without loading it. A plain transformers encoder folder (no
``modules.json``) gets sentence-transformers' own defaults: mean pooling, no
normalisation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Pooling mode → its switch in a Pooling module's config.json, in the order
# sentence-transformers concatenates the outputs when several are on.
POOLING_SWITCHES = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}

_MODULE_TRANSFORMER = "sentence_transformers.models.Transformer"
_MODULE_POOLING = "sentence_transformers.models.Pooling"
_MODULE_NORMALIZE = "sentence_transformers.models.Normalize"
_MODULE_DENSE = "sentence_transformers.models.Dense"


class UnsupportedModelError(ValueError):
    """A model folder asks for something Hearth cannot run faithfully."""


@dataclass(frozen=True)
class DenseLayer:
    path: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str  # the class name, e.g. "Tanh" or "Identity"


@dataclass(frozen=True)
class EmbeddingConfig:
    """How a folder turns token states into one vector per text."""

    transformer_path: Path
    hidden_size: int
    pooling: tuple[str, ...] = ("mean",)
    dense: tuple[DenseLayer, ...] = ()
    normalize: bool = False
    max_seq_length: int = 512
    do_lower_case: bool = False

    @property
    def dimension(self) -> int:
        if self.dense:
            return self.dense[-1].out_features
        return self.hidden_size * len(self.pooling)


def _read_json(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise UnsupportedModelError(f"{path} does not hold a JSON object")
    return data


def is_encoder_folder(folder: Path) -> bool:
    """Whether a folder looks like a sentence-transformers or transformers encoder."""
    if (folder / "modules.json").is_file():
        return True
    config = folder / "config.json"
    if not config.is_file() or (folder / "model_index.json").exists():
        return False
    try:
        data = _read_json(config)
    except (OSError, ValueError):
        return False
    return "model_type" in data and any(folder.glob("*.safetensors"))


def _pooling_modes(data: dict[str, Any]) -> tuple[str, ...]:
    modes = tuple(mode for mode, switch in POOLING_SWITCHES.items() if data.get(switch))
    if not modes:
        raise UnsupportedModelError("the Pooling module turns on no pooling mode")
    return modes


def _dense(folder: Path) -> DenseLayer:
    data = _read_json(folder / "config.json")
    if not (folder / "model.safetensors").is_file():
        raise UnsupportedModelError(f"{folder}: Dense weights must be in model.safetensors")
    activation = str(data.get("activation_function", "torch.nn.modules.activation.Tanh"))
    return DenseLayer(
        path=folder,
        in_features=int(data["in_features"]),
        out_features=int(data["out_features"]),
        bias=bool(data.get("bias", True)),
        activation=activation.rsplit(".", 1)[-1],
    )


def _encoder_shape(folder: Path) -> tuple[int, int]:
    """The encoder's hidden size and how many positions it can attend over (at most 512)."""
    data = _read_json(folder / "config.json")
    hidden = data.get("hidden_size", data.get("d_model"))
    if not isinstance(hidden, int):
        raise UnsupportedModelError(f"{folder}/config.json has no integer hidden_size")
    positions = data.get("max_position_embeddings")
    return hidden, min(positions, 512) if isinstance(positions, int) else 512


def read_embedding_config(folder: Path) -> EmbeddingConfig:
    """Read how ``folder`` embeds text; raise UnsupportedModelError if Hearth cannot."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        hidden, positions = _encoder_shape(folder)
        return EmbeddingConfig(
            transformer_path=folder, hidden_size=hidden, max_seq_length=positions
        )

    with modules_file.open(encoding="utf-8") as fh:
        modules = json.load(fh)
    transformer_path: Path | None = None
    pooling: tuple[str, ...] | None = None
    dense: list[DenseLayer] = []
    normalize = False
    for module in sorted(modules, key=lambda m: int(m.get("idx", 0))):
        kind = module.get("type", "")
        path = folder / module.get("path", "")
        if kind == _MODULE_TRANSFORMER:
            transformer_path = path
        elif kind == _MODULE_POOLING:
            pooling = _pooling_modes(_read_json(path / "config.json"))
        elif kind == _MODULE_DENSE:
            dense.append(_dense(path))
        elif kind == _MODULE_NORMALIZE:
            normalize = True
        else:
            raise UnsupportedModelError(f"{folder}: module type {kind!r} is not supported")
    if transformer_path is None:
        raise UnsupportedModelError(f"{folder}/modules.json names no Transformer module")

    hidden, positions = _encoder_shape(transformer_path)
    st_file = transformer_path / "sentence_bert_config.json"
    st = _read_json(st_file) if st_file.is_file() else {}
    max_len = st.get("max_seq_length")
    return EmbeddingConfig(
        transformer_path=transformer_path,
        hidden_size=hidden,
        pooling=pooling or ("mean",),
        dense=tuple(dense),
        normalize=normalize,
        max_seq_length=int(max_len) if max_len else positions,
        do_lower_case=bool(st.get("do_lower_case", False)),
    )
