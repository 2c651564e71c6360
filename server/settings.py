"""All server settings in one place, read from SOFTSERVE_* environment variables (or a .env file)."""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIN_KEY_CHARS = 16


def key_problem(env_name: str, key: str) -> str | None:
    """Why `key` cannot be used as an API/admin key, or None: the one rule for both keys."""
    if not key.strip():
        return f"{env_name} is set but empty; unset it, or set it to at least {MIN_KEY_CHARS} characters"
    if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        return (
            f"{env_name} must be printable ASCII without spaces (it is sent as 'Authorization: Bearer <key>')"
        )
    if len(key) < MIN_KEY_CHARS:
        return f"{env_name} has {len(key)} characters; at least {MIN_KEY_CHARS} are required"
    return None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SOFTSERVE_",
        env_file=".env",
        extra="ignore",
        hide_input_in_errors=True,  # keys stay out
    )

    # model
    model: str | None = Field(
        None, description="HF model name or path; empty = embedded SmolLM2-135M-Instruct"
    )
    dtype: str = Field(
        "auto",
        pattern="^(auto|float32|float16|bfloat16)$",
        description="auto = bfloat16 on CUDA, float32 on CPU",
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")

    # store
    store: str = Field("disk:./data/store", description="disk:PATH or redis://HOST:PORT/DB")
    store_poll_interval: float = Field(1.0, gt=0, le=60)
    keep_versions: int = Field(
        5, ge=1, le=10_000, description="versions kept per task (plus any a running request holds)"
    )
    cache_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="CPU serving-form cache bound")
    prefix_cache_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="device KV-prefix cache bound")

    # auth
    admin_key: SecretStr | None = Field(None, description="required for task writes (PUT/DELETE/compress)")
    api_key: SecretStr | None = Field(None, description="if set, required for generation and reads")
    public_docs: bool = Field(False, description="serve /docs, /redoc, /openapi.json without the API key")

    # limits
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_prompt_tokens: int = Field(2048, ge=1, description="prompt tokens including virtual tokens")
    max_new_tokens: int = Field(512, ge=1)
    max_batch_size: int = Field(32, ge=1, le=1024, description="KV slots: rows decoded together")
    kv_row_tokens: int | None = Field(
        None,
        ge=16,
        description="KV columns per row (virtual + prompt + generated tokens); default: max_prompt_tokens + "
        "max_new_tokens, at most the model context",
    )
    prompt_cache_bytes: int = Field(
        256 * 1024 * 1024,
        ge=0,
        description="KV blocks of prompt tokens reused across requests (0: off); inside kv_cache_bytes",
    )
    kv_cache_bytes: int | None = Field(
        None,
        ge=1024,
        description="KV budget: the batch holds at most this // (kv_row_tokens x one token's KV) rows; "
        "default: max_batch_size rows",
    )
    max_queue: int = Field(256, ge=1)
    request_timeout_s: float = Field(120.0, gt=0)
    drain_timeout_s: float = Field(30.0, ge=0)
    max_virtual_tokens: int = Field(1024, ge=1)

    # fine-tuning files and jobs (/v1/files, /v1/fine_tuning/jobs; run by jobs.worker)
    file_max_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="largest training file")
    file_max_lines: int = Field(100_000, ge=1, description="most examples in one training file")
    max_queued_jobs: int = Field(16, ge=1, description="jobs waiting to run; more are refused with 429")
    embedded_worker: bool = Field(True, description="the server supervises one local `jobs.worker`")
    worker_concurrency: int = Field(1, ge=1, le=64, description="jobs one worker trains at once")
    job_heartbeat_timeout_s: float = Field(
        30.0, gt=0, description="a running job whose worker is silent this long is failed"
    )
    job_work_dir: str = Field(
        "", description="worker scratch (checkpoints, loss curves); empty: beside a disk store, else $TMPDIR"
    )

    # logging and metrics
    log_level: str = Field("INFO")
    metrics_max_tasks: int = Field(
        100, ge=0, le=100_000, description="tasks with their own metric series; the rest count as _other"
    )

    @field_validator("admin_key", "api_key")
    @classmethod
    def _strong_key(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        """An empty key would match an empty header: anyone would be admin. Weak keys refuse to start."""
        if value is not None:
            problem = key_problem(f"SOFTSERVE_{str(info.field_name).upper()}", value.get_secret_value())
            if problem:
                raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _distinct_keys(self) -> Settings:
        if self.api_key is not None and self.api_key == self.admin_key:
            raise ValueError(
                "SOFTSERVE_API_KEY equals SOFTSERVE_ADMIN_KEY: the generation key would grant writes"
            )
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()


def settings_errors(exc: ValidationError) -> list[str]:
    """One line per invalid setting, named by its environment variable; never the value (keys are secret)."""
    lines = []
    for error in exc.errors():
        name = "SOFTSERVE_" + "_".join(str(part) for part in error["loc"]).upper() if error["loc"] else ""
        message = str(error["msg"]).removeprefix("Value error, ")
        lines.append(message if not name or name in message else f"{name}: {message}")
    return lines


def redact_store(spec: str) -> str:
    """The store spec fit for logs: a URL's user and password replaced by ***."""
    parts = urlsplit(spec)
    if "@" not in parts.netloc:
        return spec
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))
