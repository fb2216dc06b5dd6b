"""Which device and dtype a worker computes with, chosen once at start."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype

    def describe(self) -> dict[str, str]:
        return {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")}


def choose_placement(requested: str = "auto") -> Placement:
    """``auto`` takes the first CUDA device when there is one, else the CPU.

    On a GPU, weights run in bfloat16 where the card supports it and float16
    otherwise; on the CPU, in float32 (half precision is slower there).
    """
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {requested!r} was asked for, but CUDA is not available")
        index = device.index if device.index is not None else 0
        if index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device {requested!r} was asked for, but only "
                f"{torch.cuda.device_count()} CUDA device(s) exist"
            )
        device = torch.device("cuda", index)
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return Placement(device, dtype)
    return Placement(device, torch.float32)
