"""All server settings in one place, read from SOFTSERVE_* environment variables (or a .env file)."""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SOFTSERVE_", env_file=".env", extra="ignore")

    # model
    model: str | None = Field(
        None, description="HF model name or path; empty = embedded SmolLM2-135M-Instruct"
    )
    dtype: str = Field("float32", pattern="^(float32|float16|bfloat16)$")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")

    # store
    store: str = Field("disk:./data/store", description="disk:PATH or redis://HOST:PORT/DB")
    store_poll_interval: float = Field(1.0, gt=0, le=60)
    cache_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="CPU serving-form cache bound")
    prefix_cache_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="device KV-prefix cache bound")

    # auth
    admin_key: SecretStr | None = Field(None, description="required for task writes (PUT/DELETE/compress)")
    api_key: SecretStr | None = Field(None, description="if set, required for generation and reads")

    # limits
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_prompt_tokens: int = Field(2048, ge=1, description="prompt tokens including virtual tokens")
    max_new_tokens: int = Field(512, ge=1)
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_queue: int = Field(256, ge=1)
    request_timeout_s: float = Field(120.0, gt=0)
    drain_timeout_s: float = Field(30.0, ge=0)
    max_virtual_tokens: int = Field(1024, ge=1)

    # logging
    log_level: str = Field("INFO")


@lru_cache
def get_settings() -> Settings:
    return Settings()


def redact_store(spec: str) -> str:
    """The store spec fit for logs: a URL's user and password replaced by ***."""
    parts = urlsplit(spec)
    if "@" not in parts.netloc:
        return spec
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))
