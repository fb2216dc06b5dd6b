"""Images that do not depend on what they were batched with.

A linear layer given a batch of B images multiplies one matrix of B·T rows;
the math library picks its kernel and summation order by that row count, so
the rows of one image come out rounded a little differently with every batch
size, and after twenty denoising steps a pixel can be one level off.
Convolution kernels, too, are chosen by the batch size. Three changes make
every image's arithmetic the same in a batch as alone:

- linear layers multiply each image's rows as a matrix of their own, batched
  (``torch.bmm``): the shape each image sees no longer depends on the batch;
- convolutions run one image at a time;
- the VAE decodes one image at a time (diffusers' own slicing).

Attention and normalisation already compute each image on its own. An image
from a batch is then byte-identical to the same request alone (tested on the
CPU, across batch sizes, sizes, schedulers and thread counts). Batching still
pays: the text encoder, attention, normalisation and the Python around every
layer run once for the whole batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class BatchInvariantLinear(nn.Linear):
    """``nn.Linear`` whose output for one batch item does not depend on the others."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() < 2:
            return super().forward(input)
        batch = input.shape[0]
        rows = input.reshape(batch, -1, input.shape[-1])
        out = torch.bmm(rows, self.weight.t().expand(batch, -1, -1))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*input.shape[:-1], self.out_features)


class BatchInvariantConv2d(nn.Conv2d):
    """``nn.Conv2d`` that convolves each image of a batch on its own."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() < 4 or input.shape[0] == 1:
            return super().forward(input)
        return torch.cat(
            [
                self._conv_forward(input[i : i + 1], self.weight, self.bias)
                for i in range(len(input))
            ]
        )


INVARIANT = {nn.Linear: BatchInvariantLinear, nn.Conv2d: BatchInvariantConv2d}


def make_batch_invariant(pipe: Any) -> int:
    """Make ``pipe``'s images independent of their batch; returns the layers changed.

    Only plain ``nn.Linear`` and ``nn.Conv2d`` layers change (subclasses may
    compute differently and are left alone); their weights stay where they are.
    """
    changed = 0
    for component in pipe.components.values():
        if not isinstance(component, nn.Module):
            continue
        for module in component.modules():
            invariant = INVARIANT.get(type(module))
            if invariant is not None:
                module.__class__ = invariant
                changed += 1
    vae = getattr(pipe, "vae", None)
    if vae is not None and hasattr(vae, "enable_slicing"):
        vae.enable_slicing()
    return changed
