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


MIN_REQUEST_POSITIONS = 2  # the smallest request: one prompt token, one new token
# the manifest field that sets where the input starts, per method (num_virtual_tokens for the others)
_POSITION_FIELD = {
    "gist": "next_position",
    "gist_embedding": "num_gist_tokens",
    "gist_compressor": "num_gist_tokens",
}


def check_servable(artifact: Artifact, base: Fingerprint, max_context: int) -> None:
    """What upload adds to validate_artifact: an artifact this model could never serve is refused now, not
    at every request. The input starts at max(next_position, virtual tokens); a request needs at least one
    prompt token and one new token after that, inside the context. An artifact must also name the
    base-model weights it was trained on (an empty embedding hash would fit any weights)."""
    if base.embedding_hash and not artifact.manifest.base_model.embedding_hash:
        raise ValidationError(
            "manifest.base_model.embedding_hash is empty: the artifact does not say which base-model weights "
            f"it was trained on (this model's is {base.embedding_hash})",
            field="base_model.embedding_hash",
        )
    prompt = to_serving_form(artifact)
    start = max(prompt.next_position, prompt.num_virtual_tokens)
    if start + MIN_REQUEST_POSITIONS > max_context:
        name = _POSITION_FIELD.get(artifact.manifest.method, "num_virtual_tokens")
        raise ValidationError(
            f"{name}: the input would start at position {start}; with one prompt token and one new token "
            f"({start} + {MIN_REQUEST_POSITIONS}) that exceeds the model context of {max_context}, so no "
            f"request could ever be served (at most {max_context - MIN_REQUEST_POSITIONS})",
            field=name,
        )


def to_serving_form(artifact: Artifact) -> SoftPrompt:
    method = get_method(artifact.manifest.method)
    return method.to_serving_form(artifact.tensors, method.parse_config(artifact.manifest.method_config))
