"""Whole-artifact checks against a base model, and the conversion to serving form."""

from __future__ import annotations

from prompt_store.artifact import from_bytes
from prompt_store.errors import ValidationError
from prompt_store.methods import get_method
from prompt_store.methods.base import require_base
from prompt_store.types import SUPPORTED_DTYPES, Artifact, Fingerprint, Limits, SoftPrompt


def validate_artifact(
    artifact: Artifact, base: Fingerprint | None = None, limits: Limits | None = None
) -> None:
    """Method config, tensor names/shapes/finiteness and base-model fit. Raises a StoreError subclass."""
    limits = limits or Limits()
    manifest = artifact.manifest
    if manifest.dtype not in SUPPORTED_DTYPES:
        raise ValidationError(
            f"dtype {manifest.dtype!r} is not one of {sorted(SUPPORTED_DTYPES)}", field="dtype"
        )
    method = get_method(manifest.method)
    cfg = method.parse_config(manifest.method_config)
    target = base or manifest.base_model
    if base is not None:
        require_base(manifest.base_model, base)
    method.validate(artifact.tensors, cfg, target, limits)


def parse_and_validate(
    data: bytes, base: Fingerprint | None = None, limits: Limits | None = None
) -> Artifact:
    """Bytes from an untrusted source -> a verified artifact that fits `base` (or an exception)."""
    artifact = from_bytes(data, limits)
    validate_artifact(artifact, base, limits)
    return artifact


def to_serving_form(artifact: Artifact) -> SoftPrompt:
    method = get_method(artifact.manifest.method)
    return method.to_serving_form(artifact.tensors, method.parse_config(artifact.manifest.method_config))
