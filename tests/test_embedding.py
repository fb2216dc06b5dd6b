"""Hearth's embeddings against sentence-transformers' own `encode`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from models.device import choose_placement
from models.embedding import EmbeddingModel, reduce_dimensions
from tests.model_folders import plain_encoder, with_pooling
from workers.embeddings import EmbeddingRunner
from workers.hooks import NoHooks
from workers.protocol import Job, JobType

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hearth serves embeddings.",
    "a",
    "Ünïcödé text, emoji 🔥 and numbers 12345 all go through the tokenizer.",
    "word " * 400,  # longer than the model's 256-token limit: truncated
    *[f"sentence {i} about topic {i % 5} " * (1 + i % 4) for i in range(40)],
]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def packaged(packaged_model_path: Path) -> EmbeddingModel:
    return EmbeddingModel(packaged_model_path, choose_placement("cpu"), max_batch_tokens=16384)


@pytest.fixture(scope="module")
def reference(packaged_model_path: Path) -> Iterator[np.ndarray]:
    model = SentenceTransformer(str(packaged_model_path), device="cpu")
    yield model.encode(TEXTS, convert_to_numpy=True, batch_size=16)


def test_matches_sentence_transformers(packaged: EmbeddingModel, reference: np.ndarray) -> None:
    ours = packaged.embed(TEXTS)
    assert ours.vectors.shape == (len(TEXTS), 384)
    assert cosines(ours.vectors, reference).min() >= 0.9999
    # The folder asks for normalised vectors.
    np.testing.assert_allclose(np.linalg.norm(ours.vectors, axis=1), 1.0, atol=1e-5)


def test_long_input_is_truncated_to_the_model_limit(packaged: EmbeddingModel) -> None:
    counts = packaged.embed(TEXTS).token_counts
    assert counts[4] == 256
    assert counts[2] == 3  # [CLS] a [SEP]


def test_a_small_token_budget_splits_passes_without_changing_results(
    packaged_model_path: Path, packaged: EmbeddingModel
) -> None:
    small = EmbeddingModel(packaged_model_path, choose_placement("cpu"), max_batch_tokens=300)
    split = small.embed(TEXTS)
    whole = packaged.embed(TEXTS)
    assert len(split.batch_sizes) > len(whole.batch_sizes)
    assert sum(split.batch_sizes) == len(TEXTS)
    assert cosines(split.vectors, whole.vectors).min() >= 0.99999


def test_passes_pause_after_each_forward_pass_and_end_with_what_embed_gives(
    packaged_model_path: Path,
) -> None:
    small = EmbeddingModel(packaged_model_path, choose_placement("cpu"), max_batch_tokens=300)
    steps = small.passes(TEXTS)
    pauses = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            stepped = done.value
            break
        pauses += 1
    whole = small.embed(TEXTS)
    assert pauses == len(whole.batch_sizes) > 1
    assert stepped.batch_sizes == whole.batch_sizes
    assert stepped.token_counts == whole.token_counts
    np.testing.assert_array_equal(stepped.vectors, whole.vectors)


def embedding_jobs(texts: list[str], per_job: int) -> list[Job]:
    return [
        Job(
            type=JobType.EMBEDDINGS,
            model="all-minilm-l6-v2",
            input={"input": texts[start : start + per_job], "encoding_format": "float"},
            deadline=time.time() + 60,
        )
        for start in range(0, len(texts), per_job)
    ]


def test_a_batch_takes_the_tokens_prepared_while_it_gathered_and_answers_the_same(
    packaged: EmbeddingModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = embedding_jobs(TEXTS, per_job=3)
    runner = EmbeddingRunner("all-minilm-l6-v2", packaged)
    unprepared, unprepared_sizes = runner.run(jobs, NoHooks())
    tokenized: list[list[str]] = []
    tokenize = packaged.tokenize

    def counted(texts: list[str]) -> list[list[int]]:
        tokenized.append(list(texts))
        return tokenize(texts)

    monkeypatch.setattr(packaged, "tokenize", counted)
    runner.prepare(jobs[:5])
    runner.prepare(jobs[2:7])  # jobs prepared already are not tokenized again
    outcomes, sizes = runner.run(jobs, NoHooks())
    texts_of = [text for job in jobs for text in job.input["input"]]
    assert tokenized == [texts_of[:15], texts_of[15:21], texts_of[21:]]
    assert [outcome.result for outcome in outcomes] == [o.result for o in unprepared]
    assert sizes == unprepared_sizes
    # What the batch took is gone: the next batch of the same jobs tokenizes again.
    tokenized.clear()
    runner.run(jobs, NoHooks())
    assert tokenized == [texts_of]


@pytest.mark.parametrize("mode", ["cls", "max", "mean_sqrt_len", "weightedmean", "lasttoken"])
def test_each_pooling_mode_matches(mode: str, tmp_path: Path, packaged_model_path: Path) -> None:
    folder = with_pooling(packaged_model_path, tmp_path / mode, mode, normalize=False)
    ours = EmbeddingModel(folder, choose_placement("cpu"), max_batch_tokens=2048).embed(TEXTS[:12])
    theirs = SentenceTransformer(str(folder), device="cpu").encode(
        TEXTS[:12], convert_to_numpy=True
    )
    assert cosines(ours.vectors, theirs).min() >= 0.9999
    np.testing.assert_allclose(
        np.linalg.norm(ours.vectors, axis=1), np.linalg.norm(theirs, axis=1), rtol=1e-3
    )


def test_a_plain_transformers_folder_gets_mean_pooling(
    tmp_path: Path, packaged_model_path: Path
) -> None:
    folder = plain_encoder(packaged_model_path, tmp_path / "plain")
    ours = EmbeddingModel(folder, choose_placement("cpu"), max_batch_tokens=2048).embed(TEXTS[:8])
    theirs = SentenceTransformer(str(folder), device="cpu").encode(TEXTS[:8], convert_to_numpy=True)
    assert cosines(ours.vectors, theirs).min() >= 0.9999
    assert not np.allclose(np.linalg.norm(ours.vectors, axis=1), 1.0)  # no Normalize module


def test_reduced_dimensions_are_a_rescaled_prefix() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, 384)).astype(np.float32)
    reduced = reduce_dimensions(vectors, 64)
    assert reduced.shape == (5, 64)
    assert reduced.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(reduced, axis=1), 1.0, atol=1e-6)
    assert cosines(reduced, vectors[:, :64]).min() > 0.99999
