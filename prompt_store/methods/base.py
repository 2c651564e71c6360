"""Method registry and the shared checks every method's `validate` uses."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from prompt_store.errors import ArtifactFormatError, TooLarge, ValidationError
from prompt_store.types import Fingerprint, Limits, SoftPrompt

C = TypeVar("C")
Tensors = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Method(Generic[C]):
    """One soft-prompt family: config type, validation against a base model, and the serving form."""

    name: str
    config_type: type[C]
    validate: Callable[[Tensors, C, Fingerprint, Limits], None]
    to_serving_form: Callable[[Tensors, C], SoftPrompt]

    def parse_config(self, raw: Mapping[str, Any]) -> C:
        """Build the frozen config dataclass from a manifest dict; unknown or missing keys are errors."""
        fields = {f.name: f for f in dataclasses.fields(self.config_type)}  # type: ignore[arg-type]
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise ValidationError(f"{self.name}: unknown method_config keys {unknown}", field="method_config")
        try:
            return self.config_type(**raw)
        except TypeError as exc:
            raise ValidationError(
                f"{self.name}: method_config is incomplete: {exc}", field="method_config"
            ) from exc


METHODS: dict[str, Method[Any]] = {}


def register(method: Method[C]) -> Method[C]:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method[Any]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValidationError(
            f"unknown method {name!r}; known methods: {sorted(METHODS)}", field="method"
        ) from None


# ---- shared checks ----------------------------------------------------------------------------------------


def require_int(value: object, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValidationError(
            f"method_config.{name} must be an integer in [{low}, {high}], got {repr(value)[:80]}", field=name
        )
    return value


def require_virtual_tokens(m: object, limits: Limits, name: str = "num_virtual_tokens") -> int:
    if isinstance(m, int) and not isinstance(m, bool) and m > limits.max_virtual_tokens:
        raise TooLarge(
            f"{name}={m} exceeds the limit of {limits.max_virtual_tokens} virtual tokens", field=name
        )
    return require_int(m, name, 1, limits.max_virtual_tokens)


def require_tensors(tensors: Tensors, required: set[str], optional: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    missing = sorted(required - set(tensors))
    extra = sorted(set(tensors) - required - set(optional))
    if missing:
        raise ValidationError(f"missing tensors {missing}", field=missing[0])
    if extra:
        raise ValidationError(f"unexpected tensors {extra}", field=extra[0])


def require_shape(tensors: Tensors, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    t = tensors[name]
    if tuple(t.shape) != shape:
        raise ValidationError(
            f"tensor {name!r} has shape {list(t.shape)}; this base model needs {list(shape)}", field=name
        )
    if not t.is_floating_point():
        raise ArtifactFormatError(f"tensor {name!r} must be floating point, got {t.dtype}", field=name)
    if not bool(torch.isfinite(t).all()):
        raise ValidationError(f"tensor {name!r} contains NaN or Inf values", field=name)
    return t


def require_base(artifact_base: Fingerprint, base: Fingerprint) -> None:
    problems = base.mismatches(artifact_base)
    if problems:
        raise ValidationError(
            "artifact does not fit this base model: " + "; ".join(problems), field="base_model"
        )
