"""Domain errors of the prompt store. Each carries a short machine `reason` (metrics label)."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error the prompt store raises on purpose."""

    reason: str = "store_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidTaskId(StoreError):
    reason = "invalid_task_id"


class ArtifactFormatError(StoreError):
    """The bytes are not a well-formed softserve safetensors artifact (or are tampered)."""

    reason = "bad_artifact"


class ValidationError(StoreError):
    """The artifact is well formed but does not fit the base model or the limits."""

    reason = "invalid_artifact"


class TooLarge(ValidationError):
    reason = "too_large"


class NotFound(StoreError):
    reason = "not_found"


class UnsupportedAdapter(StoreError):
    reason = "unsupported_adapter"


class StoreUnavailable(StoreError):
    """The backend (e.g. Redis) cannot be reached right now; retry later."""

    reason = "store_unavailable"


class StoreFull(StoreError):
    """Out of space (a full disk, or Redis at maxmemory with noeviction); nothing was written."""

    reason = "store_full"
