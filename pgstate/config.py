"""Settings read from the environment (prefix ``PGSTATE_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PGSTATE_", extra="ignore")

    dsn: str | None = None
    tenant: str = Field(default="default", min_length=1, max_length=100)
    max_event_bytes: int = Field(default=1_048_576, ge=1)
    max_batch: int = Field(default=10_000, ge=1, le=10_000)
    # A batch travels as one protocol message, which the server caps at 1 GB.
    max_batch_bytes: int = Field(default=512 * 1024 * 1024, ge=1, le=768 * 1024 * 1024)
