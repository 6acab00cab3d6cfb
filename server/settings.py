"""Server settings: environment variables RECAST_* (or a .env file), overridden by `recast serve` flags."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DTYPES = ("auto", "float32", "float16", "bfloat16")
DEFAULT_HOME = Path.home() / ".local" / "share" / "recast-serve"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECAST_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535, description="also serve /metrics on this port, apart from the API"
    )
    backbone: Path | None = Field(
        default=None,
        description="a local Hugging Face encoder directory to serve (default: the bundled all-MiniLM-L6-v2)",
    )
    bank: Path = Field(
        default=DEFAULT_HOME / "bank", description="template bank directory (built here if missing)"
    )
    store: str = Field(
        default=str(DEFAULT_HOME / "tasks"), description="task store: a directory or postgresql://..."
    )
    api_keys: str = Field(
        default="", description="comma-separated keys for admin endpoints (and predict if required)"
    )
    keys_file: Path | None = Field(
        default=None, description="JSON file of hashed, tenant-scoped keys (`recast keys create`)"
    )
    predict_requires_key: bool = Field(
        default=False, description="predict and reads need a key too (any role)"
    )
    rate_limit_per_s: float = Field(
        default=100.0, ge=0, description="requests per second per API key (0: unlimited); keys may override"
    )
    rate_limit_burst: int = Field(default=200, ge=1, description="requests a key may send at once")
    anonymous_rate_limit_per_s: float = Field(
        default=50.0,
        ge=0,
        description="requests/s per client address without a key, on a server with keys (0: unlimited)",
    )
    anonymous_rate_limit_burst: int = Field(
        default=100, ge=1, description="requests a client address without a key may send at once"
    )
    header_timeout_s: float = Field(
        default=10.0, gt=0, le=300, description="seconds a connection may take to send a request's headers"
    )
    device: str = Field(
        default="auto", description="auto (CUDA when available), cpu, cuda or cuda:N: where the model serves"
    )
    dtype: str = Field(
        default="auto",
        description="auto (bfloat16 on CUDA devices that support it, else float16 there; float32 on CPU), "
        "float32, float16 or bfloat16: the serving dtype (kernels accumulate in float32)",
    )
    kernel: str | None = Field(default=None, description="force a kernel path: reference, torch or triton")
    threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads (default: torch's choice)"
    )
    max_batch_texts: int = Field(default=64, ge=1, le=4096, description="texts per batched forward")
    max_batch_tokens: int = Field(
        default=4096, ge=8, description="tokens per batched forward, counted after padding"
    )
    max_wait_ms: float = Field(default=5.0, ge=0, le=1000, description="how long a batch waits to fill up")
    max_queue_texts: int = Field(
        default=2048, ge=1, description="texts waiting beyond which requests get 429"
    )
    request_timeout_s: float = Field(default=30.0, gt=0, description="a predict waiting longer gets 503")
    max_inputs: int = Field(default=256, ge=1, le=4096, description="inputs per predict request")
    max_input_chars: int = Field(default=4096, ge=1, description="characters per input text")
    max_length: int = Field(
        default=64, ge=8, le=512, description="tokens per input (longer inputs are truncated)"
    )
    head_cache_bytes: int = Field(
        default=1 << 30,
        ge=0,
        description="memory for classifier heads and FFN edits; others are read back from the store",
    )
    max_upload_bytes: int = Field(default=1 << 20, ge=1024, description="largest accepted task artifact")
    max_training_jobs: int = Field(default=1, ge=1, le=64, description="training jobs run at once")
    max_queued_jobs: int = Field(default=8, ge=0, description="training jobs waiting beyond which 429")
    train_threads: int = Field(default=1, ge=1, description="torch threads of each training process")
    train_nice: int = Field(default=10, ge=0, le=19, description="CPU priority drop of training processes")
    train_idle_priority: bool = Field(
        default=True, description="training processes run only on CPU time serving leaves idle (SCHED_IDLE)"
    )
    job_keep_finished: int = Field(default=200, ge=1, description="finished training jobs kept per tenant")
    job_keep_days: float = Field(default=7.0, gt=0, description="days a finished training job is kept")
    max_train_examples: int = Field(default=20_000, ge=4, description="labelled examples per training job")
    preload: str = Field(
        default="",
        description="TASK_ID=ARTIFACT,...: stored at start-up if the store never held the task",
    )

    @property
    def preloads(self) -> tuple[tuple[str, Path], ...]:
        pairs = []
        for item in filter(None, (part.strip() for part in self.preload.split(","))):
            task_id, sep, path = item.partition("=")
            if not sep or not task_id.strip() or not path.strip():
                raise ValueError(f"preload entries are TASK_ID=ARTIFACT, got {item!r}")
            pairs.append((task_id.strip(), Path(path.strip()).expanduser()))
        return tuple(pairs)

    @field_validator("preload")
    @classmethod
    def _preload_pairs(cls, value: str) -> str:
        for item in filter(None, (part.strip() for part in value.split(","))):
            task_id, sep, path = item.partition("=")
            if not sep or not task_id.strip() or not path.strip():
                raise ValueError(f"preload entries are TASK_ID=ARTIFACT, got {item!r}")
        return value

    @field_validator("device")
    @classmethod
    def _device_syntax(cls, value: str) -> str:
        value = value.strip().lower()
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]{1,2})?", value):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value[:40]!r}")
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype_name(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {value[:40]!r}")
        return value

    @field_validator("store")
    @classmethod
    def _store_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("store must be a directory path or a postgresql:// DSN")
        return value.strip()

    @model_validator(mode="after")
    def _auth_is_consistent(self) -> Settings:
        has_keys = bool(self.keys) or self.keys_file is not None
        if self.predict_requires_key and not has_keys:
            raise ValueError("RECAST_PREDICT_REQUIRES_KEY needs RECAST_API_KEYS or RECAST_KEYS_FILE")
        if not has_keys and self.host not in LOOPBACK:
            raise ValueError(
                f"RECAST_API_KEYS or RECAST_KEYS_FILE is required when binding to {self.host} (anyone "
                "reaching it could upload and delete tasks); set keys, or bind to 127.0.0.1"
            )
        return self

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.api_keys.split(",") if k.strip())
