"""Loading diffusers folders: shared components, and the limits the registry reads."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from models.components import ComponentCache, file_set
from models.device import choose_placement
from models.diffusion import load_text_to_image
from models.image_config import read_image_limits
from models.registry import ModelKind, Registry


def test_a_component_two_pipelines_reference_is_loaded_once(demo_store: Path) -> None:
    cache = ComponentCache()
    placement = choose_placement("cpu")
    unet_pipe: Any = load_text_to_image(demo_store / "demo-unet", placement, cache)
    dit_pipe: Any = load_text_to_image(demo_store / "demo-dit", placement, cache)
    assert dit_pipe.vae is unet_pipe.vae
    assert dit_pipe.text_encoder is not unet_pipe.text_encoder
    assert len(cache) == 5  # CLIP, U-Net, VAE; T5, DiT
    again: Any = load_text_to_image(demo_store / "demo-unet", placement, cache)
    assert again.unet is unet_pipe.unet
    assert again.scheduler is not unet_pipe.scheduler  # schedulers are never shared


def test_a_copied_folder_is_a_different_component(demo_store: Path, tmp_path: Path) -> None:
    shutil.copytree(demo_store / "demo-unet" / "vae", tmp_path / "vae")
    assert file_set(tmp_path / "vae") != file_set(demo_store / "demo-unet" / "vae")
    (tmp_path / "linked").symlink_to(demo_store / "demo-unet" / "vae")
    assert file_set(tmp_path / "linked") == file_set(demo_store / "demo-unet" / "vae")


def test_the_registry_serves_diffusers_folders_as_image_models(demo_store: Path) -> None:
    registry = Registry.scan(demo_store)
    unet = registry.get("demo-unet")
    assert unet.kind is ModelKind.IMAGE
    assert unet.image is not None
    assert unet.image.size_step == 8
    assert registry.get("demo-dit").image.size_step == 16  # type: ignore[union-attr]
    assert "euler_a" in unet.image.schedulers


def test_limits_default_from_the_components(demo_store: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no-limits"
    shutil.copytree(demo_store / "demo-unet", folder)
    (folder / "hearth.yaml").unlink()
    limits = read_image_limits(folder)
    assert (limits.max_width, limits.max_height) == (1024, 1024)
    assert limits.default_steps == 30
    assert limits.default_scheduler == "DDIMScheduler"


def test_bad_limits_keep_a_model_out_with_the_reason(demo_store: Path, tmp_path: Path) -> None:
    shutil.copytree(demo_store / "demo-unet", tmp_path / "odd-limits")
    for limits, reason in (
        ("max_steps: 0\n", "max_steps"),
        ("max_width: 100\n", "multiple of size_step (8)"),
        ("default_steps: 200\n", "default_steps must not exceed max_steps"),
    ):
        (tmp_path / "odd-limits" / "hearth.yaml").write_text(limits)
        registry = Registry.scan(tmp_path)
        assert "odd-limits" not in registry
        assert reason in registry.skipped["odd-limits"]
    (tmp_path / "odd-limits" / "hearth.yaml").write_text("maximum_width: 512\n")
    assert "maximum_width" in Registry.scan(tmp_path).skipped["odd-limits"]
