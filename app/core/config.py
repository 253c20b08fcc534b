"""Settings from environment variables (prefix PBRF_), with embedded defaults when nothing is set.

With nothing configured the service runs self-contained under ./var: a SQLite database, a local
artifact store and kombu's filesystem:// broker. Production sets PBRF_DATABASE_URL (PostgreSQL) and
PBRF_BROKER_URL (Redis); the code paths are the same.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PBRF_", env_file=".env", env_ignore_empty=True, extra="ignore")

    data_dir: Path = Field(Path("var"), description="Root for the embedded defaults (database, artifacts, queue).")
    database_url: str = Field("", description="SQLAlchemy URL; default sqlite:///<data_dir>/pbrf-audit.db.")
    broker_url: str = Field("filesystem://", description="Celery broker URL, e.g. redis://127.0.0.1:6379/0.")
    storage_dir: Path | None = Field(None, description="Content-addressed artifact store; default <data_dir>/artifacts.")
    queue_name: str = Field("pbrf-audits", description="Celery queue the audits go to.")
    api_keys: str = Field("", description="Static keys, 'tenant:secret,...', besides those made with `pbrf-audit keys`.")
    host: str = "127.0.0.1"
    port: int = 8000

    # 2 GiB: a CIFAR-sized training set (50k x 3x32x32 float32) is 614 MB uncompressed
    max_upload_bytes: int = Field(2 * 1024**3, description="Largest accepted request body (413 above).")
    max_dataset_bytes: int = Field(4 * 1024**3, description="Largest uncompressed dataset arrays (zip-bomb guard).")
    max_examples: int = 5_000_000
    max_features: int = 10_000_000  # elements per example
    max_classes: int = 100_000
    max_table_columns: int = Field(16_384, ge=1, description=(
        "Feature columns a CSV or Parquet dataset may have (checked from the header or schema before any row is "
        "parsed: the API's parse time grows with every column); wider examples (images) belong in .npz."))
    max_exact_parameters: int = 12_000
    worker_memory_bytes: int = Field(8 * 1024**3, ge=256 * 1024**2, description=(
        "Memory one audit may make a worker allocate; an audit whose parameters (lanczos_rank, batch_size, "
        "verify_top_k) price above it is refused at creation with the estimate, and the audit's process runs under it: "
        "on a CPU worker RLIMIT_DATA beyond the imports, on a GPU worker the share of the GPU's memory torch may take "
        "(torch.cuda.set_per_process_memory_fraction)."))
    max_flags: int = Field(20_000, ge=1, description=(
        "Flag rows stored per audit (most suspicious first); every example's score stays in the scores file. "
        "Bounds the results transaction, which would otherwise lock the database for other tenants."))
    model_validation_timeout_seconds: float = Field(120.0, description="Limit for converting + smoke-testing an upload.")
    model_validation_memory_bytes: int = Field(8 * 1024**3, ge=256 * 1024**2, description=(
        "Data-segment limit (RLIMIT_DATA) of the process that converts and smoke-tests an uploaded model, on top "
        "of what its imports take: a graph or architecture that would allocate more is refused, not run."))
    max_concurrent_validations: int = Field(2, ge=1, description=(
        "Model validations one API process runs at once; another upload waits up to 10 s, then gets 503."))
    max_concurrent_dataset_parses: int = Field(2, ge=1, description=(
        "Datasets one API process parses at once (uploads, attribution queries, label downloads, example reads of "
        "CSV/Parquet): each may take up to max_dataset_bytes while parsed, so the API's memory for them stays "
        "within this many times that; another request waits up to 10 s, then gets 503 `dataset-parser-busy`."))
    tenant_storage_bytes: int = Field(100 * 1024**3, ge=0, description=(
        "What one tenant may keep stored: uploads plus an estimate of its audits' results (scores file and "
        "flag rows). Above it uploads get 413 and audits 422 `storage-quota-exceeded`; 0: no quota."))
    max_active_audits_per_tenant: int = Field(
        20, ge=1, description="Queued or running audits one tenant may have; a new one above that gets 429.")

    shard_size: int = Field(50_000, ge=1, description=(
        "Examples per shard of an audit's blockwise fit and scoring; an audit over more is split so that "
        "several workers share it (an audit's own shard_size overrides this)."))
    worker_concurrency: int = Field(1, ge=1, le=64, description=(
        "Worker processes `serve` and `worker` start (each runs one job at a time, on CPU with its share of "
        "the cores); one per GPU on a GPU machine."))
    worker_threads: int | None = Field(None, ge=1, le=1024, description=(
        "torch threads per CPU worker process; unset: the cores divided among the worker processes, and "
        "under `serve` (API and worker on one machine) one core left to the API when there are several"))
    heartbeat_seconds: float = 5.0
    stale_after_seconds: float = 120.0
    reaper_interval_seconds: float = 30.0
    garbage_grace_seconds: float = Field(
        3600.0, description="Stored files no row refers to (after a DELETE) are removed once this old.")
    # one audit's (or attribution's) wall-clock limit: the worker kills its process when it is reached
    task_soft_time_limit: int = 3 * 3600
    task_time_limit: int = 3 * 3600 + 300
    broker_visibility_timeout: int = 4 * 3600

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'pbrf-audit.db').resolve()}"
        if self.storage_dir is None:
            self.storage_dir = self.data_dir / "artifacts"
        if self.database_url.startswith("postgresql://"):
            self.database_url = "postgresql+psycopg://" + self.database_url[len("postgresql://"):]
        if not (self.task_soft_time_limit < self.task_time_limit < self.broker_visibility_timeout):
            raise ValueError("need task_soft_time_limit < task_time_limit < broker_visibility_timeout")
        return self

    @property
    def queue_dir(self) -> Path:
        return self.data_dir / "queue"

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url.startswith("filesystem://")


@lru_cache
def get_settings() -> Settings:
    return Settings()
