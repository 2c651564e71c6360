"""P-tuning (Liu et al. 2021): an MLP/LSTM encoder produces the prepended vectors.

The encoder is training-only; the artifact stores its output `prompt [m, d]`.
"""

from __future__ import annotations

from dataclasses import dataclass

from prompt_store.errors import ValidationError
from prompt_store.methods.base import (
    Method,
    Tensors,
    register,
    require_shape,
    require_tensors,
    require_virtual_tokens,
)
from prompt_store.types import Fingerprint, Limits, SoftPrompt

ENCODER_TYPES = ("mlp", "lstm")


@dataclass(frozen=True)
class PTuningConfig:
    num_virtual_tokens: int
    encoder_type: str = "mlp"
    encoder_hidden_size: int = 0  # informational


def validate(tensors: Tensors, cfg: PTuningConfig, base: Fingerprint, limits: Limits) -> None:
    m = require_virtual_tokens(cfg.num_virtual_tokens, limits)
    if cfg.encoder_type not in ENCODER_TYPES:
        raise ValidationError(f"encoder_type must be one of {ENCODER_TYPES}", field="encoder_type")
    require_tensors(tensors, {"prompt"})
    require_shape(tensors, "prompt", (m, base.hidden_size))


def to_serving_form(tensors: Tensors, cfg: PTuningConfig) -> SoftPrompt:
    prompt = tensors["prompt"]  # [m, d]
    return SoftPrompt(embeds=prompt, next_position=int(prompt.shape[0]))


METHOD = register(Method("p_tuning", PTuningConfig, validate, to_serving_form))
