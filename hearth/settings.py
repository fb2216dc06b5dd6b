"""The one settings object, read from the environment and validated at start.

Every variable has the prefix ``HEARTH_`` except ``REDIS_URL``, which keeps the
name every Redis-aware tool already uses. Nothing else in Hearth reads
``os.environ``.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LogLevel = Literal["debug", "info", "warning", "error"]


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "hearth"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HEARTH_", extra="ignore")

    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "HEARTH_REDIS_URL"),
        description="Redis to queue jobs in. Unset: `hearth serve` starts a private one.",
    )
    namespace: str = Field(
        default="hearth",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Prefix of every Redis key, so several deployments can share one Redis.",
    )
    state_dir: Path = Field(
        default_factory=_default_state_dir,
        description="Where `hearth serve` keeps its private Redis data and the model store.",
    )
    models_dir: Path | None = Field(
        default=None,
        description="The model store: one folder per model. Default: STATE_DIR/models.",
    )
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated model ids to serve. Empty: every model the registry finds.",
    )
    host: str = Field(default="127.0.0.1", description="Address the API listens on.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port the API listens on.")
    device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="Worker device: auto (CUDA when present), cpu, cuda or cuda:N.",
    )
    torch_threads: int = Field(
        default=0, ge=0, description="CPU threads for inference; 0 lets torch decide."
    )
    pin_threads: bool = Field(
        default=False,
        description="Bind a worker's inference threads to cores: for a worker with the machine "
        "to itself (`hearth serve` turns it on); off where workers share cores.",
    )
    keep_freed_memory: bool = Field(
        default=True,
        description="A worker keeps the memory its inference frees for its next call (glibc's "
        "malloc thresholds, fixed with mallopt) instead of handing it back to the system and "
        "faulting it in again every call; its resident memory then stays near its largest call.",
    )
    max_batch_jobs: int = Field(
        default=64, ge=1, le=4096, description="Most jobs a worker takes from a stream at once."
    )
    max_batch_tokens: int | None = Field(
        default=None,
        ge=64,
        description="Most padded tokens in one embedding forward pass. Default: 1024 on a CPU "
        "(where larger passes run slower per text), 16384 on a GPU.",
    )
    embedding_batch_wait_ms: float | None = Field(
        default=None,
        ge=0,
        le=1000,
        description="Under load (the model's last batch held several jobs), how long an "
        "embedding batch waits for each further job: it starts once it holds as many jobs as "
        "the last batch, once this long passes with no new job, or after twice this in all. "
        "Default: 10 on a CPU, where one pass of 30 texts costs less per text than two of 15; "
        "0 on a GPU.",
    )
    max_batch_images: int = Field(
        default=8, ge=1, le=256, description="Most images a worker generates in one pipeline call."
    )
    batch_invariant_images: bool = Field(
        default=True,
        description="Make each image of a batch byte-identical to its request run alone "
        "(convolutions then run one image at a time); false trades that for throughput, and an "
        "image from a batch may differ by one level of 255 on a few pixels.",
    )
    webhook_secret: SecretStr | None = Field(
        default=None, description="Key of the HMAC-SHA256 signature on webhook deliveries."
    )
    webhook_attempts: int = Field(
        default=5, ge=1, le=20, description="Tries per webhook delivery, with backoff."
    )
    public_url: str | None = Field(
        default=None,
        description="Base URL clients reach the API at; makes file URLs in webhooks absolute.",
    )
    max_queue_depth: int = Field(
        default=1000,
        ge=1,
        description="Jobs a model's queue may hold (waiting or running); past it, 429.",
    )
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="Largest request body accepted; past it, 413."
    )
    max_inputs: int = Field(
        default=2048, ge=1, description="Most strings in one embeddings request."
    )
    max_input_chars: int = Field(
        default=100_000, ge=1, description="Longest string accepted as one embeddings input."
    )
    request_timeout_s: float = Field(
        default=60.0, gt=0, description="Deadline of a synchronous request; past it, 504."
    )
    reclaim_after_s: float = Field(
        default=60.0,
        gt=0,
        description="A job a worker took but has not touched for this long goes to another worker.",
    )
    max_attempts: int = Field(
        default=3, ge=1, le=100, description="Tries per job before it goes to the dead letters."
    )
    worker_name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="A worker's stable name; on restart it first finishes its own unfinished jobs.",
    )
    job_timeout_s: float = Field(
        default=3600.0, gt=0, description="Deadline of a queued (async) job; past it, expired."
    )
    result_ttl_s: int = Field(
        default=3600, ge=1, description="How long jobs and their results stay readable in Redis."
    )
    heartbeat_s: float = Field(default=2.0, gt=0, description="Worker heartbeat period.")
    worker_ttl_s: float = Field(
        default=10.0, gt=0, description="A worker silent this long counts as gone."
    )
    redis_timeout_s: float = Field(
        default=3.0, gt=0, description="Connect and command timeout towards Redis."
    )
    follow_outage_s: float = Field(
        default=30.0,
        gt=0,
        description="How long a job's event stream waits for an unreachable Redis to come back "
        "before it ends with an error event.",
    )
    redis_max_connections: int = Field(
        default=128,
        ge=2,
        description="Most Redis connections one API process opens; more requests wait their turn.",
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated API keys; when any is set, requests need one.",
    )
    api_keys_file: Path | None = Field(
        default=None, description="A file of API keys, one per line (added to HEARTH_API_KEYS)."
    )
    rate_limit_per_s: float = Field(
        default=0.0, ge=0, description="Requests per second per API key (or client); 0: no limit."
    )
    rate_limit_burst: int = Field(
        default=0, ge=0, description="Requests a caller may send at once; 0: the rate, rounded up."
    )
    log_level: LogLevel = Field(default="info", description="Log level of every process.")
    log_format: Literal["json", "text"] = Field(
        default="json", description="`json`: one object per line, with request_id and job_id."
    )
    worker_metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port a worker serves its Prometheus metrics on; 0: none.",
    )

    @field_validator("models", "api_keys", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.worker_ttl_s <= self.heartbeat_s:
            raise ValueError("HEARTH_WORKER_TTL_S must be longer than HEARTH_HEARTBEAT_S")
        return self

    def all_api_keys(self) -> list[str]:
        """The keys from HEARTH_API_KEYS and HEARTH_API_KEYS_FILE (blank lines and # comments
        skipped). Raises OSError naming the file if it cannot be read."""
        keys = [key.get_secret_value() for key in self.api_keys]
        if self.api_keys_file is not None:
            for line in self.api_keys_file.read_text(encoding="utf-8").splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    keys.append(line.strip())
        return keys

    @property
    def model_store(self) -> Path:
        return self.models_dir if self.models_dir is not None else self.state_dir / "models"


@lru_cache
def get_settings() -> Settings:
    return Settings()
