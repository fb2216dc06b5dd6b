"""A worker's Prometheus metrics, served on ``HEARTH_WORKER_METRICS_PORT``.

Prometheus scrapes each worker as a target of its own (a pod port in
Kubernetes, a service port in compose); the API's `/metrics` covers the HTTP
side and the queues.
"""

from __future__ import annotations

import os
import resource

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PHASE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


def _resident_bytes() -> float:
    """This process's resident memory (Linux: now; elsewhere: its peak)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return float(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except OSError:
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter(
            "hearth_worker_jobs",
            "Jobs this worker ended, by model and final status.",
            ["model", "status"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "hearth_worker_batch_size",
            "Inputs per model call (texts for embeddings, images for pipelines).",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=self.registry,
        )
        self.queued_seconds = Histogram(
            "hearth_job_queued_seconds",
            "From a job's submission to its start on this worker.",
            ["model"],
            buckets=PHASE_BUCKETS,
            registry=self.registry,
        )
        self.run_seconds = Histogram(
            "hearth_job_run_seconds",
            "From a job's start to its outcome stored.",
            ["model"],
            buckets=PHASE_BUCKETS,
            registry=self.registry,
        )
        self.load_seconds = Gauge(
            "hearth_worker_model_load_seconds",
            "How long loading each model took at start.",
            ["model"],
            registry=self.registry,
        )
        self.memory = Gauge(
            "hearth_worker_memory_bytes",
            "Memory in use: the process's resident memory, and allocated device memory.",
            ["kind"],
            registry=self.registry,
        )
        self.memory.labels("resident").set_function(_resident_bytes)

    def track_device(self, device: str) -> None:
        if device.startswith("cuda"):
            import torch

            index = torch.device(device).index or 0
            self.memory.labels(device).set_function(lambda: torch.cuda.memory_allocated(index))

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)
