"""Prefix tuning (Li & Liang 2021): trained key/value prefixes at every layer.

The MLP reparameterisation is training-only; the artifact stores the per-layer keys and values.
"""

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
class PrefixTuningConfig:
    num_virtual_tokens: int
    projection: bool = False  # informational: was an MLP reparameterisation used in training


def validate(tensors: Tensors, cfg: PrefixTuningConfig, base: Fingerprint, limits: Limits) -> None:
    m = require_virtual_tokens(cfg.num_virtual_tokens, limits)
    require_tensors(tensors, {"keys", "values"})
    shape = (base.num_layers, base.num_kv_heads, m, base.head_dim)
    require_shape(tensors, "keys", shape)
    require_shape(tensors, "values", shape)


def to_serving_form(tensors: Tensors, cfg: PrefixTuningConfig) -> SoftPrompt:
    keys, values = tensors["keys"], tensors["values"]  # [L, Hkv, m, Dh] each
    return SoftPrompt(keys=keys, values=values, next_position=int(keys.shape[2]))


METHOD = register(Method("prefix_tuning", PrefixTuningConfig, validate, to_serving_form))
