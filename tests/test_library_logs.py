"""transformers' and diffusers' records go where Hearth's own go."""

from __future__ import annotations

import logging

import pytest

from models.library_logs import adopt


def test_library_warnings_reach_the_root_logger_but_the_torchvision_fallback_does_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    adopt("transformers", "diffusers")
    adopt("transformers", "diffusers")  # again: nothing doubles
    with caplog.at_level(logging.WARNING):
        logging.getLogger("transformers.modeling_utils").warning("weights not used")
        logging.getLogger("diffusers.pipelines.pipeline_utils").warning("a component is missing")
        logging.getLogger("transformers.utils.import_utils").warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to "
            "`CLIPImageProcessorPil` for backward compatibility."
        )
        logging.getLogger("transformers.utils.import_utils").warning("another import warning")
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["weights not used", "a component is missing", "another import warning"]
    filters = logging.getLogger("transformers.utils.import_utils").filters
    assert len(filters) == 1
    # Their own stderr handlers are gone, their records go on to the root logger's:
    # nothing prints past the process's handlers (a test run may add handlers of its own).
    for library in ("transformers", "diffusers"):
        logger = logging.getLogger(library)
        assert logger.propagate
        assert not [each for each in logger.handlers if type(each) is logging.StreamHandler]
