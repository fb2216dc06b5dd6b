"""What the image benchmarks ask for, in-process and through Hearth alike.

``image_input`` is the job input the API queues for a request of this prompt
and guidance, so the raw runner and the worker generate the same image for the
same seed. No third-party imports: the GPU benchmark runs where only Hearth and
torch are installed.
"""

from __future__ import annotations

from typing import Any

PROMPT = "a lighthouse by the sea at dusk, oil on canvas"
GUIDANCE = 7.5


def image_input(size: int, steps: int, seed: int, n: int = 1) -> dict[str, Any]:
    """The job input of ``n`` ``size``-pixel square images from ``seed`` on."""
    return {
        "prompt": PROMPT,
        "negative_prompt": "",
        "n": n,
        "width": size,
        "height": size,
        "steps": steps,
        "guidance": GUIDANCE,
        "seed": seed,
        "scheduler": "",
        "response_format": "b64_json",
    }
