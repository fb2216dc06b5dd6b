"""An image does not depend on what it was batched with."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from torch import nn

from models.batch_invariance import (
    BatchInvariantConv2d,
    BatchInvariantLinear,
    make_batch_invariant,
)
from models.components import ComponentCache
from models.device import choose_placement
from models.diffusion import load_text_to_image

SEEDS = list(range(100, 108))


def test_a_row_of_a_batch_equals_the_row_alone() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 96)
    invariant = nn.Linear(64, 96)
    invariant.load_state_dict(layer.state_dict())
    invariant.__class__ = BatchInvariantLinear
    batch = torch.randn(6, 16, 64)
    with torch.inference_mode():
        together = invariant(batch)
        alone = torch.cat([invariant(batch[i : i + 1]) for i in range(6)])
        assert torch.equal(together, alone)
        torch.testing.assert_close(together, layer(batch))
        pooled = torch.randn(6, 64)  # (batch, features), as timestep embeddings are
        assert torch.equal(invariant(pooled), torch.cat([invariant(row[None]) for row in pooled]))
        assert torch.equal(invariant(pooled[0]), invariant(pooled[0]))  # 1-D input still works


def test_every_plain_linear_and_convolution_layer_is_changed_once(demo_store: Path) -> None:
    pipe: Any = load_text_to_image(
        demo_store / "demo-unet", choose_placement("cpu"), ComponentCache()
    )
    kinds = {type(module) for module in pipe.unet.modules()}
    assert {BatchInvariantLinear, BatchInvariantConv2d} <= kinds
    assert not {nn.Linear, nn.Conv2d} & kinds
    assert pipe.vae.use_slicing
    assert make_batch_invariant(pipe) == 0  # nothing left to change


@dataclass(frozen=True)
class Call:
    model: str
    guidance: float = 4.5
    width: int = 64
    height: int = 64
    scheduler: str = ""  # the pipeline's own
    threads: int = 0  # torch's default

    def images(self, pipe: Any, seeds: list[int]) -> list[np.ndarray]:
        if self.scheduler:
            pipe.scheduler = getattr(diffusers, self.scheduler).from_config(pipe.scheduler.config)
        accepted = inspect.signature(pipe.__call__).parameters
        extra = {name: False for name in ("use_resolution_binning", "clean_caption")}
        result = pipe(
            prompt=[f"a lighthouse at dusk, number {seed}" for seed in seeds],
            width=self.width,
            height=self.height,
            num_inference_steps=12,
            guidance_scale=self.guidance,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
            output_type="pil",
            **{name: value for name, value in extra.items() if name in accepted},
        )
        return [np.asarray(image) for image in result.images]


CALLS = [
    Call("demo-unet"),
    Call("demo-dit"),
    # No classifier-free guidance: a batch of n against a batch of one.
    Call("demo-unet", guidance=1.0, width=64, height=128, scheduler="DDIMScheduler"),
    Call("demo-dit", guidance=1.0, width=64, height=128, scheduler="DDIMScheduler"),
    Call(
        "demo-unet",
        guidance=7.0,
        width=128,
        height=64,
        scheduler="DPMSolverMultistepScheduler",
        threads=1,
    ),
]


# diffusers' multistep schedulers hand numpy a torch tensor (their warning, not Hearth's).
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize("call", CALLS, ids=str)
def test_each_image_of_a_batch_is_byte_identical_to_its_request_alone(
    demo_store: Path, call: Call
) -> None:
    pipe: Any = load_text_to_image(
        demo_store / call.model, choose_placement("cpu"), ComponentCache()
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(call.threads or threads)
    try:
        together = call.images(pipe, SEEDS)
        for seed, image in zip(SEEDS, together, strict=True):
            (alone,) = call.images(pipe, [seed])
            assert np.array_equal(image, alone), f"seed {seed} differs when batched"
        three = call.images(pipe, SEEDS[2:5])
    finally:
        torch.set_num_threads(threads)
    assert all(np.array_equal(a, b) for a, b in zip(three, together[2:5], strict=True))


def test_a_worker_may_trade_byte_equality_for_throughput(demo_store: Path) -> None:
    pipe: Any = load_text_to_image(
        demo_store / "demo-dit", choose_placement("cpu"), ComponentCache(), batch_invariant=False
    )
    kinds = {type(module) for module in pipe.transformer.modules()}
    assert nn.Linear in kinds
    assert BatchInvariantLinear not in kinds
    assert not pipe.vae.use_slicing
