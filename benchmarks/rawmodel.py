"""The raw model, in a process of its own: the ceiling Hearth is measured against.

It loads the embedding model the way the worker does (same code, device,
threads and OpenMP environment) and answers measurement requests, one JSON
line in, one JSON line out, so the benchmark can time it between its other
measurements, under the same conditions as they ran:

    {"op": "latency", "warmup": 1.0, "seconds": 5.0, "idle_ms": 0}  → {"p50_ms": ...}
    {"op": "call", "sentence": 7} → {"ms": ...}  (one call of that one sentence)
    {"op": "throughput", "batch": 32, "seconds": 3.0} → {"texts_per_s": ..., "ms_per_call": ...}

``RawModel`` starts it and talks to it; run as a script it is the server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class RawResult:
    """The model called in-process with one fixed batch size."""

    batch_size: int
    texts_per_s: float
    ms_per_call: float


class RawModel:
    """A raw-model process; ``env`` is added to its environment (OpenMP, threads)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "rawmodel.py")],
            env={**os.environ, **env},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.info = self._read()  # sent once loaded: torch threads

    def __enter__(self) -> RawModel:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the raw model process exited ({self.process.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def _ask(self, **request: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._read()

    def latency_ms(self, warmup_s: float, seconds: float, idle_ms: float = 0.0) -> float:
        """p50 of one-text calls, in ms: back to back, or each after ``idle_ms`` idle."""
        answer = self._ask(op="latency", warmup=warmup_s, seconds=seconds, idle_ms=idle_ms)
        return float(answer["p50_ms"])

    def call_ms(self, sentence: int) -> float:
        """Ms of one batch-1 call of sentence ``sentence`` (benchmarks/sentences.py, cycled)."""
        return float(self._ask(op="call", sentence=sentence)["ms"])

    def throughput(self, batch_size: int, seconds: float) -> RawResult:
        """Texts per second of back-to-back calls of ``batch_size`` texts."""
        answer = self._ask(op="throughput", batch=batch_size, seconds=seconds)
        return RawResult(batch_size, answer["texts_per_s"], answer["ms_per_call"])

    def close(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()  # end of input: the server returns
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _serve() -> None:
    import numpy as np
    import torch
    from sentences import SENTENCES

    from hearth.memory import keep_freed_memory
    from hearth.settings import Settings
    from models.device import choose_placement
    from models.embedding import EmbeddingModel
    from models.registry import PACKAGED_EMBEDDING_ID, Registry

    settings = Settings()
    if settings.keep_freed_memory:
        keep_freed_memory()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    spec = Registry.scan(settings.model_store).get(PACKAGED_EMBEDDING_ID)
    # One forward pass per call, of exactly the batch asked for: the worker's
    # mean batch is counted in passes too.
    model = EmbeddingModel(spec.path, choose_placement("cpu"), max_batch_tokens=1 << 30)

    def batch(size: int, offset: int) -> list[str]:
        return [SENTENCES[(offset + i) % len(SENTENCES)] for i in range(size)]

    def latency(warmup: float, seconds: float, idle_ms: float) -> dict[str, float]:
        latencies: list[float] = []
        warm_until = time.perf_counter() + warmup
        end = warm_until + seconds
        call = 0
        while time.perf_counter() < end:
            if idle_ms:
                time.sleep(idle_ms / 1000)
            now = time.perf_counter()
            model.embed(batch(1, call))
            call += 1
            if now >= warm_until:
                latencies.append(time.perf_counter() - now)
        return {"p50_ms": float(np.percentile(latencies, 50)) * 1000}

    def throughput(size: int, seconds: float) -> dict[str, float]:
        model.embed(batch(size, 0))  # warm this shape
        calls = 0
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            model.embed(batch(size, calls * size))
            calls += 1
        return {"texts_per_s": calls * size / elapsed, "ms_per_call": elapsed / calls * 1000}

    print(json.dumps({"torch_threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "latency":
            answer = latency(request["warmup"], request["seconds"], request.get("idle_ms", 0.0))
        elif request["op"] == "call":
            started = time.perf_counter()
            model.embed(batch(1, int(request["sentence"])))
            answer = {"ms": (time.perf_counter() - started) * 1000}
        else:
            answer = throughput(int(request["batch"]), request["seconds"])
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    _serve()
