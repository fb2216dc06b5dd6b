"""transformers and diffusers log the way every Hearth process does.

Left to themselves, both print their warnings straight to stderr in a format of
their own, between Hearth's JSON lines, and draw progress bars. ``adopt`` hands
their records to the process's own handlers instead (see ``hearth.logs``), and
drops one warning that misleads here: transformers says, for every image
processor class a diffusers pipeline module names, that torchvision is missing
and it falls back to the PIL implementation. Hearth's pipelines run no
torchvision image processor, and torchvision's wheels would bring a torch
build of their own.
"""

from __future__ import annotations

import importlib
import logging

TORCHVISION_FALLBACK = "requires torchvision (not installed)"


class _NotTheTorchvisionFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return TORCHVISION_FALLBACK not in record.getMessage()


_FILTER = _NotTheTorchvisionFallback()


def adopt(*libraries: str) -> None:
    """Route ``libraries``' logs (``transformers``, ``diffusers``) through the root
    logger, without progress bars. Safe to call again."""
    for name in libraries:
        library = importlib.import_module(f"{name}.utils.logging")
        library.disable_default_handler()
        library.enable_propagation()
        library.disable_progress_bar()
    # The logger transformers warns on; a filter added twice is kept once.
    logging.getLogger("transformers.utils.import_utils").addFilter(_FILTER)
