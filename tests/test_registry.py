from __future__ import annotations

from pathlib import Path

import pytest

from models.registry import PACKAGED_EMBEDDING_ID, ModelKind, Registry, UnknownModelError
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
