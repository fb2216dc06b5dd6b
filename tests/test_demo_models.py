"""The demo pipelines: built offline, reloaded by diffusers, and they generate."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, PixArtTransformer2DModel, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from transformers import AutoTokenizer

from models import demo
from models.demo import DEMO_MODEL_IDS, build_demo_models
from tests.support import one_torch_thread

PROMPT = "a photo of a cat"
LAYOUT = {
    "demo-unet": {
        "model_index.json",
        "hearth.yaml",
        "text_encoder",
        "tokenizer",
        "unet",
        "vae",
        "scheduler",
    },
    "demo-dit": {
        "model_index.json",
        "hearth.yaml",
        "text_encoder",
        "tokenizer",
        "transformer",
        "vae",
        "scheduler",
    },
}
DENOISER = {"demo-unet": UNet2DConditionModel, "demo-dit": PixArtTransformer2DModel}


def digests(folder: Path) -> dict[str, str]:
    """Relative path → sha256 of every file under ``folder``."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("store")
    written = build_demo_models(folder)
    assert written == [folder / model_id for model_id in DEMO_MODEL_IDS]
    return folder


@pytest.fixture(scope="module")
def pipes(store: Path) -> Iterator[dict[str, Any]]:
    """The demo pipelines, reloaded from the store, run on one CPU thread."""
    diffusers_logging.disable_progress_bar()
    loaded = {}
    for model_id in DEMO_MODEL_IDS:
        pipe = DiffusionPipeline.from_pretrained(store / model_id, local_files_only=True)  # type: ignore[no-untyped-call]
        pipe.set_progress_bar_config(disable=True)
        loaded[model_id] = pipe
    with one_torch_thread():
        yield loaded


def generate(pipe: Any, *, seed: int = 1, height: int = 64, width: int = 64) -> np.ndarray:
    extra = {"use_resolution_binning": False, "clean_caption": False}
    is_dit = hasattr(pipe, "transformer")
    image = pipe(
        PROMPT,
        num_inference_steps=20,
        height=height,
        width=width,
        generator=torch.Generator().manual_seed(seed),
        output_type="pil",
        **(extra if is_dit else {}),
    ).images[0]
    assert image.size == (width, height)
    return np.asarray(image)


def test_layout(store: Path) -> None:
    assert sorted(p.name for p in store.iterdir()) == sorted(DEMO_MODEL_IDS)  # no temp folders
    for model_id, expected in LAYOUT.items():
        assert {p.name for p in (store / model_id).iterdir()} == expected
        assert list((store / model_id).rglob("*.safetensors"))
        assert not list((store / model_id).rglob("*.bin"))


def test_the_vae_files_are_shared(store: Path) -> None:
    """demo-dit's VAE is demo-unet's, file for file, so a worker loads it once."""
    unet_vae = sorted((store / "demo-unet" / "vae").iterdir())
    dit_vae = sorted((store / "demo-dit" / "vae").iterdir())
    assert [p.name for p in unet_vae] == [p.name for p in dit_vae]
    for a, b in zip(unet_vae, dit_vae, strict=True):
        assert a.stat().st_ino == b.stat().st_ino


def test_limits_file_lets_demo_models_go_to_512(store: Path) -> None:
    from models.image_config import read_image_limits

    limits = read_image_limits(store / "demo-unet")
    assert (limits.max_width, limits.max_height) == (512, 512)
    assert (limits.default_width, limits.default_height) == (64, 64)
    assert limits.default_steps == 20


@pytest.mark.parametrize("model_id", DEMO_MODEL_IDS)
def test_reloads_as_the_right_pipeline(pipes: dict[str, Any], model_id: str) -> None:
    pipe = pipes[model_id]
    denoiser = pipe.unet if model_id == "demo-unet" else pipe.transformer
    assert isinstance(denoiser, DENOISER[model_id])
    assert pipe.vae_scale_factor == 8


@pytest.mark.parametrize("model_id", DEMO_MODEL_IDS)
def test_generates_deterministic_varied_images(pipes: dict[str, Any], model_id: str) -> None:
    first = generate(pipes[model_id], seed=1)
    assert first.shape == (64, 64, 3)
    assert first.std() > 5.0  # not a flat colour
    assert np.array_equal(first, generate(pipes[model_id], seed=1))
    assert not np.array_equal(first, generate(pipes[model_id], seed=2))


@pytest.mark.parametrize("model_id", DEMO_MODEL_IDS)
def test_other_sizes(pipes: dict[str, Any], model_id: str) -> None:
    assert generate(pipes[model_id], height=96, width=128).shape == (96, 128, 3)


@pytest.mark.parametrize("model_id", DEMO_MODEL_IDS)
def test_tokenizer_takes_any_text(store: Path, model_id: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(store / model_id / "tokenizer")
    for text in ["café 🔥", "Zebras! 1234 ünïcödé — 漢字", "", "word " * 500]:
        ids = tokenizer(text, truncation=True)["input_ids"]
        assert ids and all(0 <= i < len(tokenizer) for i in ids)
    # Printable ASCII is always in the vocabulary; CLIP's byte-level BPE covers everything.
    texts = ["Hello, World! ~{x} [y] 42%"] + (["café 🔥"] if model_id == "demo-unet" else [])
    for text in texts:
        assert tokenizer.unk_token_id not in tokenizer(text, add_special_tokens=False)["input_ids"]


def test_existing_folders_are_kept(store: Path) -> None:
    before = {model_id: digests(store / model_id) for model_id in DEMO_MODEL_IDS}
    assert build_demo_models(store) == []
    assert {model_id: digests(store / model_id) for model_id in DEMO_MODEL_IDS} == before


def test_builds_are_reproducible_and_overwrite_is_atomic(store: Path, tmp_path: Path) -> None:
    (tmp_path / "demo-dit").mkdir()
    (tmp_path / "demo-dit" / "stale.txt").write_text("old")
    assert build_demo_models(tmp_path, overwrite=True) == [tmp_path / m for m in DEMO_MODEL_IDS]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(DEMO_MODEL_IDS)
    for model_id in DEMO_MODEL_IDS:  # same files as the first build, byte for byte
        assert digests(tmp_path / model_id) == digests(store / model_id)


class HalfWritten:
    """A pipeline whose save fails halfway, as a full disk or a crash would."""

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        pass

    def save_pretrained(self, folder: Path, **kwargs: Any) -> None:
        folder.mkdir()
        (folder / "model_index.json").write_text("{}")
        raise OSError("disk full")


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_build_leaves_no_partial_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    if existing:  # overwriting: the old folder must survive the failure
        (tmp_path / "demo-dit").mkdir()
        (tmp_path / "demo-dit" / "model_index.json").write_text("kept")
    monkeypatch.setattr(demo, "DEMO_MODEL_IDS", ("demo-dit",))
    monkeypatch.setitem(demo._BUILDERS, "demo-dit", HalfWritten)
    with pytest.raises(OSError, match="disk full"):
        build_demo_models(tmp_path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == (["demo-dit"] if existing else [])
    if existing:
        assert (tmp_path / "demo-dit" / "model_index.json").read_text() == "kept"
