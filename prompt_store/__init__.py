"""softserve prompt store: the artifact contract shared by the server and the trainers."""

from prompt_store.artifact import (
    from_bytes,
    load,
    make_artifact,
    save,
    tensors_sha256,
    to_bytes,
    with_version,
)
from prompt_store.errors import (
    ArtifactFormatError,
    InvalidTaskId,
    NotFound,
    StoreError,
    StoreFull,
    StoreUnavailable,
    TooLarge,
    UnsupportedAdapter,
    ValidationError,
)
from prompt_store.methods import METHODS, get_method
from prompt_store.task_id import TASK_ID_PATTERN, validate_task_id
from prompt_store.types import (
    RAW_FORMAT,
    Artifact,
    Fingerprint,
    InputFormat,
    Limits,
    Manifest,
    SoftPrompt,
    TaskKey,
    TaskPrompt,
)
from prompt_store.validation import check_servable, parse_and_validate, to_serving_form, validate_artifact

__all__ = [
    "METHODS",
    "RAW_FORMAT",
    "TASK_ID_PATTERN",
    "Artifact",
    "ArtifactFormatError",
    "Fingerprint",
    "InputFormat",
    "InvalidTaskId",
    "Limits",
    "Manifest",
    "NotFound",
    "SoftPrompt",
    "TaskKey",
    "TaskPrompt",
    "StoreError",
    "StoreUnavailable",
    "TooLarge",
    "StoreFull",
    "UnsupportedAdapter",
    "ValidationError",
    "from_bytes",
    "get_method",
    "load",
    "make_artifact",
    "parse_and_validate",
    "save",
    "tensors_sha256",
    "to_bytes",
    "to_serving_form",
    "check_servable",
    "validate_artifact",
    "validate_task_id",
    "with_version",
]
