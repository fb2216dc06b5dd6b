"""The `hearth` command's surface."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.model_folders import plain_encoder
from tests.support import HEARTH, hearth_env


def hearth(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HEARTH, *args], env=hearth_env(**env), capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((), "serve"),
        (("serve",), "--port"),
        (("api",), "--host"),
        (("worker",), "--device"),
        (("models", "list"), "List the model ids"),
    ],
)
def test_every_command_has_help(args: tuple[str, ...], words: str) -> None:
    result = hearth(*args, "--help")
    assert result.returncode == 0, result.stderr
    assert words in result.stdout


def test_models_list_shows_packaged_and_store_models(
    tmp_path: Path, packaged_model_path: Path
) -> None:
    plain_encoder(packaged_model_path, tmp_path / "my-encoder")
    (tmp_path / "empty-folder").mkdir()
    result = hearth("models", "list", HEARTH_MODELS_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("all-minilm-l6-v2\tembedding\t384 dims") for line in lines)
    assert any(line.startswith("my-encoder\tembedding") for line in lines)
    assert "empty-folder\tskipped" in result.stderr


def test_a_bad_setting_stops_the_command_naming_the_variable() -> None:
    result = hearth("models", "list", HEARTH_MAX_BATCH_JOBS="zero")
    assert result.returncode == 2
    assert "HEARTH_MAX_BATCH_JOBS" in result.stderr


def test_a_worker_for_an_unknown_model_refuses_to_start(tmp_path: Path) -> None:
    result = hearth(
        "worker",
        "--models",
        "nope",
        REDIS_URL="redis://127.0.0.1:1/0",
        HEARTH_STATE_DIR=str(tmp_path),
    )
    assert result.returncode == 2
    assert "nope" in result.stderr


def test_models_list_shows_aliases(tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_text(
        "models:\n"
        "  all-minilm-l6-v2:\n"
        "    aliases: [text-embedding-3-small, text-embedding-ada-002]\n"
    )
    result = hearth("models", "list", HEARTH_MODELS_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("all-minilm")]
    assert line.endswith("\taliases: text-embedding-3-small, text-embedding-ada-002")


@pytest.mark.parametrize("command", [("models", "list"), ("api",), ("worker",), ("serve",)])
def test_a_models_yaml_that_cannot_be_followed_stops_every_command(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    store = tmp_path / "models"
    store.mkdir()
    (store / "models.yaml").write_text("models:\n  ghost:\n    aliases: [spirit]\n")
    result = hearth(
        *command,
        REDIS_URL="redis://127.0.0.1:1/0",
        HEARTH_STATE_DIR=str(tmp_path),
        HEARTH_MODELS_DIR=str(store),
    )
    assert result.returncode == 2, result.stderr
    assert "models.yaml: ghost: no such model in the store" in result.stderr


def test_an_api_for_an_unknown_model_refuses_to_start(tmp_path: Path) -> None:
    result = hearth(
        "api",
        REDIS_URL="redis://127.0.0.1:1/0",
        HEARTH_STATE_DIR=str(tmp_path),
        HEARTH_MODELS="nope",
    )
    assert result.returncode == 2
    assert "unknown model 'nope'" in result.stderr
