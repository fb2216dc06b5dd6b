"""What a runner may ask of the worker while a batch runs."""

from __future__ import annotations

from typing import Protocol


class BatchHooks(Protocol):
    def progress(self, job_ids: list[str], step: int, total: int) -> None:
        """Report that ``job_ids`` finished denoising step ``step`` of ``total``."""

    def cancelled(self, job_id: str) -> bool:
        """Whether a client cancelled ``job_id`` since the batch started."""


class NoHooks:
    """Hooks for running a batch outside a worker (benchmarks, tests)."""

    def progress(self, job_ids: list[str], step: int, total: int) -> None:
        pass

    def cancelled(self, job_id: str) -> bool:
        return False
