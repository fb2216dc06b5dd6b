from __future__ import annotations

import re
from pathlib import Path

import pytest

from models.registry import (
    PACKAGED_EMBEDDING_ID,
    ModelKind,
    ModelsFileError,
    Registry,
    UnknownModelError,
)
from tests.model_folders import plain_encoder, with_pooling


def test_the_packaged_model_is_always_there(tmp_path: Path) -> None:
    registry = Registry.scan(tmp_path / "no-store")
    spec = registry.get(PACKAGED_EMBEDDING_ID)
    assert spec.kind is ModelKind.EMBEDDING
    assert spec.dimension == 384
    assert spec.max_tokens == 256
    assert (spec.path / "model.safetensors").is_file()


def test_store_folders_are_served_under_their_names(
    tmp_path: Path, packaged_model_path: Path
) -> None:
    plain_encoder(packaged_model_path, tmp_path / "plain-bert")
    with_pooling(packaged_model_path, tmp_path / "cls.bert_v2", "cls", normalize=True)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    plain_encoder(packaged_model_path, tmp_path / "bad name!")

    registry = Registry.scan(tmp_path)

    assert {spec.id for spec in registry} == {PACKAGED_EMBEDDING_ID, "plain-bert", "cls.bert_v2"}
    assert registry.get("plain-bert").max_tokens == 512  # from max_position_embeddings
    assert "notes" in registry.skipped
    assert "valid model id" in registry.skipped["bad name!"]


def test_a_folder_with_an_unsupported_module_is_skipped_with_the_reason(
    tmp_path: Path, packaged_model_path: Path
) -> None:
    folder = with_pooling(packaged_model_path, tmp_path / "odd", "mean", normalize=False)
    (folder / "modules.json").write_text(
        '[{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},'
        ' {"idx": 1, "path": "x", "type": "sentence_transformers.models.LSTM"}]'
    )
    registry = Registry.scan(tmp_path)
    assert "odd" not in registry
    assert "LSTM" in registry.skipped["odd"]


def test_select_names_the_unknown_model(tmp_path: Path) -> None:
    registry = Registry.scan(tmp_path)
    assert [spec.id for spec in registry.select([])] == [PACKAGED_EMBEDDING_ID]
    with pytest.raises(UnknownModelError) as info:
        registry.select([PACKAGED_EMBEDDING_ID, "missing"])
    assert info.value.model_id == "missing"


def write_models_file(store: Path, text: str) -> None:
    store.mkdir(parents=True, exist_ok=True)
    (store / "models.yaml").write_text(text)


def test_models_yaml_adds_folders_from_elsewhere_and_aliases(
    tmp_path: Path, packaged_model_path: Path
) -> None:
    store = tmp_path / "store"
    plain_encoder(packaged_model_path, store / "in-store")
    plain_encoder(packaged_model_path, tmp_path / "weights" / "far-away")
    write_models_file(
        store,
        "models:\n"
        "  outside:\n    path: ../weights/far-away\n    aliases: [text-embedding-ada-002]\n"
        f"  {PACKAGED_EMBEDDING_ID}:\n    aliases: [text-embedding-3-small]\n",
    )
    registry = Registry.scan(store)
    assert {spec.id for spec in registry} == {PACKAGED_EMBEDDING_ID, "in-store", "outside"}
    outside = registry.get("outside")
    assert outside.path == store / ".." / "weights" / "far-away"
    assert registry.get("text-embedding-ada-002") is outside
    assert registry.get("text-embedding-3-small").id == PACKAGED_EMBEDDING_ID
    assert registry.get(PACKAGED_EMBEDDING_ID).aliases == ("text-embedding-3-small",)
    # A worker told to hold a model by two of its names holds it once.
    assert [spec.id for spec in registry.select(["outside", "text-embedding-ada-002"])] == [
        "outside"
    ]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("models: [a, b]\n", "models: Input should be a valid dictionary"),
        ("models:\n  in-store:\n    alias: [x]\n", "models.in-store.alias: Extra inputs"),
        ("models:\n  nowhere:\n    aliases: [x]\n", "nowhere: no such model in the store"),
        ("models:\n  new:\n    path: missing\n", "holds no model Hearth can serve"),
        ("models:\n  in-store:\n    path: ../far\n", "already served"),
        ("models:\n  in-store:\n    aliases: [all-minilm-l6-v2]\n", "already names the model"),
        (
            "models:\n  in-store:\n    aliases: [x]\n  all-minilm-l6-v2:\n    aliases: [x]\n",
            "'x' already names the model in-store",
        ),
        ("models:\n  in-store:\n    aliases: ['bad name']\n", "not a valid model id"),
        ("models: {in-store: [\n", "models.yaml"),
    ],
)
def test_a_models_yaml_that_cannot_be_followed_says_why(
    tmp_path: Path, packaged_model_path: Path, text: str, words: str
) -> None:
    plain_encoder(packaged_model_path, tmp_path / "in-store")
    plain_encoder(packaged_model_path, tmp_path.parent / f"{tmp_path.name}-far")
    write_models_file(tmp_path, text.replace("../far", f"../{tmp_path.name}-far"))
    with pytest.raises(ModelsFileError, match=re.escape(words)):
        Registry.scan(tmp_path)
