"""Runs jobs of the no-op model: every job succeeds at once, having done nothing.

It exists so that a benchmark can measure what the queue itself costs (submit,
stream, worker start and finish, reply) with no model time in the way.
"""

from __future__ import annotations

from workers.hooks import BatchHooks
from workers.protocol import Job, JobStatus, Outcome

RESULT = b'{"object":"noop"}'


class NoopRunner:
    def run(self, jobs: list[Job], hooks: BatchHooks) -> tuple[list[Outcome], list[int]]:
        return [Outcome(JobStatus.SUCCEEDED, result=RESULT) for _ in jobs], [len(jobs)]
