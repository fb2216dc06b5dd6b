"""Model folders for tests, made from the packaged model's files by symlink."""

from __future__ import annotations

import json
from pathlib import Path

from models.st_config import POOLING_SWITCHES

ENCODER_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def plain_encoder(source: Path, folder: Path) -> Path:
    """A transformers encoder folder with no sentence-transformers config."""
    folder.mkdir(parents=True)
    for name in ENCODER_FILES:
        (folder / name).symlink_to(source / name)
    return folder


def with_pooling(source: Path, folder: Path, mode: str, normalize: bool) -> Path:
    """An encoder with a sentence-transformers Pooling module set to ``mode``."""
    plain_encoder(source, folder)
    (folder / "sentence_bert_config.json").symlink_to(source / "sentence_bert_config.json")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    config = {
        "word_embedding_dimension": 384,
        **{switch: False for switch in POOLING_SWITCHES.values()},
    }
    config[POOLING_SWITCHES[mode]] = True
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(config))
    return folder
