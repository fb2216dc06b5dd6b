"""Runs embeddings jobs: many requests, one model call, each its own answer.

Every text of every job in a batch goes through one ``EmbeddingModel.passes``
call (which sorts by length and splits by token budget); the vectors are then
cut back per job and encoded as the OpenAI response body the API returns.
While a batch gathers under load, its jobs' texts are tokenized as they come
(``prepare``), so the batch starts with its forward pass.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import orjson

from models.embedding import EmbeddingModel, reduce_dimensions
from models.stepwise import Steps, complete
from workers.hooks import BatchHooks
from workers.protocol import Job, JobStatus, Outcome


def _encode_row(row: np.ndarray, encoding_format: str) -> Any:
    if encoding_format == "base64":
        return base64.b64encode(row.astype("<f4", copy=False).tobytes()).decode("ascii")
    return row


class EmbeddingRunner:
    def __init__(self, model_id: str, model: EmbeddingModel) -> None:
        self.model_id = model_id
        self.model = model
        self._tokenized: dict[str, list[list[int]]] = {}  # job id → its texts' token ids

    def prepare(self, jobs: list[Job]) -> None:
        """Tokenize the texts of jobs whose batch is still gathering, while it
        waits for the rest: the batch then starts with its first forward pass.
        Only the next batch's jobs are kept; the batch takes them."""
        self._tokenized.update(self._tokenize([j for j in jobs if j.id not in self._tokenized]))

    def _tokenize(self, jobs: list[Job]) -> dict[str, list[list[int]]]:
        """Each job's texts' token ids, by job id, in one tokenizer call."""
        if not jobs:
            return {}
        token_ids = self.model.tokenize([text for job in jobs for text in job.input["input"]])
        by_job: dict[str, list[list[int]]] = {}
        start = 0
        for job in jobs:
            count = len(job.input["input"])
            by_job[job.id] = token_ids[start : start + count]
            start += count
        return by_job

    def run(self, jobs: list[Job], hooks: BatchHooks) -> tuple[list[Outcome], list[int]]:
        """Outcomes in the order of ``jobs``, and the forward-pass sizes used."""
        return complete(self.passes(jobs, hooks))

    def passes(self, jobs: list[Job], hooks: BatchHooks) -> Steps[tuple[list[Outcome], list[int]]]:
        """``run``, yielding after each forward pass."""
        texts = [text for job in jobs for text in job.input["input"]]
        embedded = yield from self.model.passes(texts, self._take_tokenized(jobs))
        outcomes: list[Outcome] = []
        start = 0
        for job in jobs:
            count = len(job.input["input"])
            vectors = embedded.vectors[start : start + count]
            tokens = sum(embedded.token_counts[start : start + count])
            start += count
            outcomes.append(Outcome(JobStatus.SUCCEEDED, result=self._body(job, vectors, tokens)))
        return outcomes, embedded.batch_sizes

    def _take_tokenized(self, jobs: list[Job]) -> list[list[int]] | None:
        """The token ids of every text of ``jobs``, in order, those ``prepare`` made
        and the others tokenized now; None when ``prepare`` made none of them."""
        tokenized, self._tokenized = self._tokenized, {}  # what the batch leaves never ran
        if not any(job.id in tokenized for job in jobs):
            return None
        tokenized.update(self._tokenize([job for job in jobs if job.id not in tokenized]))
        return [ids for job in jobs for ids in tokenized[job.id]]

    def _body(self, job: Job, vectors: np.ndarray, tokens: int) -> bytes:
        dimensions = job.input.get("dimensions")
        if dimensions:
            vectors = reduce_dimensions(vectors, int(dimensions))
        encoding_format = job.input.get("encoding_format", "float")
        return orjson.dumps(
            {
                "object": "list",
                "data": [
                    {
                        "object": "embedding",
                        "index": index,
                        "embedding": _encode_row(row, encoding_format),
                    }
                    for index, row in enumerate(vectors)
                ],
                "model": self.model_id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
            option=orjson.OPT_SERIALIZE_NUMPY,
        )
