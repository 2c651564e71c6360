"""Prompt tuning (Lester et al. 2021): m trainable vectors prepended to the input embeddings."""

from __future__ import annotations

from dataclasses import dataclass

from prompt_store.methods.base import (
    Method,
    Tensors,
    register,
    require_shape,
    require_tensors,
    require_virtual_tokens,
)
from prompt_store.types import Fingerprint, Limits, SoftPrompt


@dataclass(frozen=True)
class PromptTuningConfig:
    num_virtual_tokens: int
    init: str = "random"  # informational: random | vocab | text


def validate(tensors: Tensors, cfg: PromptTuningConfig, base: Fingerprint, limits: Limits) -> None:
    m = require_virtual_tokens(cfg.num_virtual_tokens, limits)
    require_tensors(tensors, {"prompt"})
    require_shape(tensors, "prompt", (m, base.hidden_size))


def to_serving_form(tensors: Tensors, cfg: PromptTuningConfig) -> SoftPrompt:
    prompt = tensors["prompt"]  # [m, d]
    return SoftPrompt(embeds=prompt, next_position=int(prompt.shape[0]))


METHOD = register(Method("prompt_tuning", PromptTuningConfig, validate, to_serving_form))
