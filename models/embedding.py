"""Embedding models: a transformers encoder plus the folder's own pooling,
dense layers and normalisation, matching sentence-transformers' ``encode``.

Loaded once per worker; ``embed`` then runs many times. Texts are tokenized
once, sorted by length and cut into forward passes bounded by a token budget,
so short texts are not padded to the length of long ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

from models import library_logs
from models.device import Placement
from models.st_config import (
    DenseLayer,
    EmbeddingConfig,
    UnsupportedModelError,
    read_embedding_config,
)
from models.stepwise import Steps, complete

logger = logging.getLogger(__name__)

_ACTIVATIONS = {
    "Tanh": torch.nn.Tanh,
    "Identity": torch.nn.Identity,
    "ReLU": torch.nn.ReLU,
    "GELU": torch.nn.GELU,
    "Sigmoid": torch.nn.Sigmoid,
}


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray  # float32, one row per text, in the order given
    token_counts: list[int]  # tokens each text used, after truncation
    batch_sizes: list[int]  # texts per forward pass that produced them


def _load_dense(layer: DenseLayer, placement: Placement) -> torch.nn.Module:
    if layer.activation not in _ACTIVATIONS:
        raise UnsupportedModelError(f"{layer.path}: activation {layer.activation} is not supported")
    linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias)
    state = load_file(str(layer.path / "model.safetensors"))
    linear.load_state_dict({key.removeprefix("linear."): value for key, value in state.items()})
    module = torch.nn.Sequential(linear, _ACTIVATIONS[layer.activation]())
    return module.to(device=placement.device, dtype=placement.dtype).eval()


# Padded tokens per forward pass when not configured. On a CPU, throughput per
# text peaks around 32-64 short texts a pass and falls beyond; a GPU wants more.
DEFAULT_BATCH_TOKENS = {"cpu": 1024, "cuda": 16384}


class EmbeddingModel:
    def __init__(
        self, folder: Path, placement: Placement, max_batch_tokens: int | None = None
    ) -> None:
        library_logs.adopt("transformers")
        self.config: EmbeddingConfig = read_embedding_config(folder)
        self.placement = placement
        self.max_batch_tokens = max_batch_tokens or DEFAULT_BATCH_TOKENS.get(
            placement.device.type, DEFAULT_BATCH_TOKENS["cpu"]
        )
        path = self.config.transformer_path
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.encoder = AutoModel.from_pretrained(
            path, local_files_only=True, use_safetensors=True, dtype=placement.dtype
        ).to(placement.device)
        self.encoder.eval()
        self.dense = [_load_dense(layer, placement) for layer in self.config.dense]
        self._pad_id = self.tokenizer.pad_token_id or 0
        self._with_token_types = "token_type_ids" in self.tokenizer.model_input_names

    @property
    def dimension(self) -> int:
        return self.config.dimension

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, with special tokens, truncated to the model's limit."""
        if self.config.do_lower_case:
            texts = [text.lower() for text in texts]
        encoded = self.tokenizer(
            texts,
            truncation=True,
            max_length=self.config.max_seq_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        ids: list[list[int]] = encoded["input_ids"]
        return ids

    def embed(self, texts: list[str]) -> Embeddings:
        """Embed ``texts``; rows come back in the order given."""
        return complete(self.passes(texts))

    def passes(
        self, texts: list[str], token_ids: list[list[int]] | None = None
    ) -> Steps[Embeddings]:
        """Embed ``texts`` as ``embed`` does, yielding after each forward pass.
        ``token_ids``: what ``tokenize`` gave for them, when they were tokenized before."""
        if token_ids is None:
            token_ids = self.tokenize(texts)
        order = sorted(range(len(texts)), key=lambda i: len(token_ids[i]))
        vectors = np.empty((len(texts), self.dimension), dtype=np.float32)
        batch_sizes: list[int] = []
        for chunk in self._chunks(order, token_ids):
            vectors[chunk] = self._forward([token_ids[i] for i in chunk])
            batch_sizes.append(len(chunk))
            yield
        return Embeddings(vectors, [len(ids) for ids in token_ids], batch_sizes)

    def _chunks(self, order: list[int], token_ids: list[list[int]]) -> list[list[int]]:
        """Cut texts sorted by length into passes of at most max_batch_tokens padded tokens."""
        chunks: list[list[int]] = []
        current: list[int] = []
        for index in order:
            longest = len(token_ids[index])  # sorted ascending: this one sets the padding
            if current and longest * (len(current) + 1) > self.max_batch_tokens:
                chunks.append(current)
                current = []
            current.append(index)
        if current:
            chunks.append(current)
        return chunks

    @torch.inference_mode()
    def _forward(self, batch: list[list[int]]) -> np.ndarray:
        width = max(len(ids) for ids in batch)
        input_ids = np.full((len(batch), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        device = self.placement.device
        inputs = {
            "input_ids": torch.from_numpy(input_ids).to(device),
            "attention_mask": torch.from_numpy(mask).to(device),
        }
        if self._with_token_types:
            inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
        states = self.encoder(**inputs).last_hidden_state
        pooled = self._pool(states, inputs["attention_mask"])
        for layer in self.dense:
            pooled = layer(pooled)
        pooled = pooled.float()
        if self.config.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.cpu().numpy()

    def _pool(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pool token states the way the folder's Pooling module says."""
        weights = mask.unsqueeze(-1).to(states.dtype)
        lengths = weights.sum(dim=1).clamp(min=1e-9)
        outputs: list[torch.Tensor] = []
        for mode in self.config.pooling:
            if mode == "cls":
                outputs.append(states[:, 0])
            elif mode == "max":
                masked = states.masked_fill(weights == 0, torch.finfo(states.dtype).min)
                outputs.append(masked.max(dim=1).values)
            elif mode == "mean":
                outputs.append((states * weights).sum(dim=1) / lengths)
            elif mode == "mean_sqrt_len":
                outputs.append((states * weights).sum(dim=1) / lengths.sqrt())
            elif mode == "weightedmean":
                positions = torch.arange(1, states.shape[1] + 1, device=states.device)
                position_weights = weights * positions.view(1, -1, 1).to(states.dtype)
                total = position_weights.sum(dim=1).clamp(min=1e-9)
                outputs.append((states * position_weights).sum(dim=1) / total)
            elif mode == "lasttoken":
                last = mask.sum(dim=1) - 1
                outputs.append(states[torch.arange(states.shape[0], device=states.device), last])
        return torch.cat(outputs, dim=1)


def reduce_dimensions(vectors: np.ndarray, dimensions: int) -> np.ndarray:
    """Keep the first ``dimensions`` values and rescale each row to unit length,
    as OpenAI's ``dimensions`` parameter does."""
    cut = vectors[:, :dimensions]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return np.asarray(cut / np.maximum(norms, 1e-12), dtype=np.float32)
