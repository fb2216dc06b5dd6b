"""The README tells the truth: its examples run, its settings table is complete."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from hearth.settings import Settings
from models.registry import ModelsFile
from tests.conftest import Stack

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_every_setting_is_in_the_table() -> None:
    for name in Settings.model_fields:
        variable = "REDIS_URL" if name == "redis_url" else f"HEARTH_{name.upper()}"
        assert f"| `{variable}` |" in README, f"{variable} is missing from the README's table"


def test_the_two_commands_are_make_targets() -> None:
    makefile = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    assert "make serve" in README and "make test" in README
    assert re.search(r"^serve: install$", makefile, flags=re.M)
    assert re.search(r"^test: install$", makefile, flags=re.M)


def run_curl(stack: Stack, needle: str) -> dict[str, Any]:
    (curl,) = [b for b in blocks("bash") if b.lstrip().startswith("curl") and needle in b]
    command = curl.replace("http://127.0.0.1:8000", stack.url)
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    body: dict[str, Any] = json.loads(result.stdout)
    return body


@pytest.mark.integration
def test_the_curl_example_works(stack: Stack) -> None:
    body = run_curl(stack, "/v1/embeddings")
    assert [item["index"] for item in body["data"]] == [0, 1]
    assert body["data"][0]["object"] == "embedding"


@pytest.mark.integration
def test_the_jobs_example_works(stack: Stack) -> None:
    job = run_curl(stack, "/v1/jobs")
    assert job["status"] == "queued"
    with httpx.Client(base_url=stack.url) as http:
        assert http.delete(f"/v1/jobs/{job['id']}").status_code in (200, 409)


@pytest.mark.integration
def test_the_openai_example_works(stack: Stack, tmp_path: Path) -> None:
    (example,) = blocks("python")
    code = example.replace("http://127.0.0.1:8000", stack.url)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    dims, tokens = result.stdout.split()
    assert dims == "384" and int(tokens) > 0
    assert (tmp_path / "lighthouse.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "lighthouse-at-night.png").read_bytes().startswith(b"\x89PNG")


def test_the_models_yaml_example_is_one_hearth_reads() -> None:
    (example,) = re.findall(r"```yaml\n(.*?)```", README, flags=re.S)
    models = ModelsFile.model_validate(yaml.safe_load(textwrap.dedent(example))).models
    assert models["all-minilm-l6-v2"].aliases == [
        "text-embedding-3-small",
        "text-embedding-ada-002",
    ]
