from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from hearth.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("HEARTH_") or name == "REDIS_URL":
            monkeypatch.delenv(name)


def test_models_are_read_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEARTH_MODELS", " all-minilm-l6-v2 , other,,")
    assert Settings().models == ["all-minilm-l6-v2", "other"]


def test_redis_url_is_read_without_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://example:6380/2")
    assert Settings().redis_url == "redis://example:6380/2"


def test_model_store_defaults_under_the_state_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HEARTH_STATE_DIR", str(tmp_path))
    assert Settings().model_store == tmp_path / "models"
    monkeypatch.setenv("HEARTH_MODELS_DIR", str(tmp_path / "elsewhere"))
    assert Settings().model_store == tmp_path / "elsewhere"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("HEARTH_PORT", "70000"),
        ("HEARTH_DEVICE", "tpu"),
        ("HEARTH_NAMESPACE", "has space"),
        ("HEARTH_MAX_BATCH_JOBS", "0"),
        ("HEARTH_LOG_LEVEL", "loud"),
    ],
)
def test_bad_values_are_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    field = name.removeprefix("HEARTH_").lower()
    assert info.value.errors()[0]["loc"] == (field,)


def test_worker_ttl_must_outlast_the_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEARTH_HEARTBEAT_S", "5")
    monkeypatch.setenv("HEARTH_WORKER_TTL_S", "4")
    with pytest.raises(ValidationError, match="HEARTH_WORKER_TTL_S"):
        Settings()
