"""Scheduler names a request may ask for, and the diffusers class behind each.

Kept as plain names (no diffusers import) so the API can validate a request
without loading torch. Two families exist: the noise-prediction schedulers that
U-Net and most DiT pipelines use, and the flow-matching ones that SD3, Flux and
their kin accept; a model takes names from its own family only.
"""

from __future__ import annotations

NOISE_SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2s": "DPMSolverSinglestepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "deis": "DEISMultistepScheduler",
}

FLOW_SCHEDULERS = {
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
    "flow_heun": "FlowMatchHeunDiscreteScheduler",
}


# PNDMScheduler opens with a Runge-Kutta warm-up over the last `pndm_order` (4)
# timesteps, unless its config skips it (`skip_prk_steps`, as Stable Diffusion's
# does); asked for fewer steps, diffusers fails mid-call. Every other scheduler
# here runs from 1 step.
PNDM_ORDER = 4


def min_steps(class_name: str, skip_prk_steps: bool) -> int:
    """The fewest inference steps the scheduler ``class_name`` runs with."""
    if class_name == NOISE_SCHEDULERS["pndm"] and not skip_prk_steps:
        return PNDM_ORDER
    return 1


def scheduler_choices(default_class: str) -> dict[str, str]:
    """The names a model whose own scheduler is ``default_class`` accepts."""
    if default_class.startswith("FlowMatch"):
        return FLOW_SCHEDULERS
    return NOISE_SCHEDULERS
