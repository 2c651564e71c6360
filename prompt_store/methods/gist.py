"""Gist tokens (Mu et al. 2023): an instruction compressed into the keys/values of k gist tokens.

Two artifact kinds share this family:
- `gist` (this module): the compressed instruction, a KV prefix for the k gist positions plus the
  position the input continues at (instruction length + k, as the gists were computed after it).
- `gist_embedding` (below): the k learned gist-token embeddings used to compress instructions.
- `gist_compressor` (below): gist embeddings plus a LoRA adapter on the attention projections, active only
  while an instruction is compressed (runtime/gist.py); the serving model never runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

from prompt_store.errors import ValidationError
from prompt_store.methods.base import (
    Method,
    Tensors,
    register,
    require_int,
    require_shape,
    require_tensors,
    require_virtual_tokens,
)
from prompt_store.types import Fingerprint, Limits, SoftPrompt

MAX_POSITION = 1 << 20


@dataclass(frozen=True)
class GistConfig:
    num_gist_tokens: int
    next_position: int
    instruction: str = ""  # informational: the compressed instruction, if the owner wants it kept


def validate(tensors: Tensors, cfg: GistConfig, base: Fingerprint, limits: Limits) -> None:
    k = require_virtual_tokens(cfg.num_gist_tokens, limits, "num_gist_tokens")
    require_int(cfg.next_position, "next_position", k, MAX_POSITION)
    require_tensors(tensors, {"keys", "values"})
    shape = (base.num_layers, base.num_kv_heads, k, base.head_dim)
    require_shape(tensors, "keys", shape)
    require_shape(tensors, "values", shape)


def to_serving_form(tensors: Tensors, cfg: GistConfig) -> SoftPrompt:
    keys, values = tensors["keys"], tensors["values"]  # [L, Hkv, k, Dh] each
    return SoftPrompt(keys=keys, values=values, next_position=cfg.next_position)


@dataclass(frozen=True)
class GistEmbeddingConfig:
    num_gist_tokens: int


def validate_embedding(tensors: Tensors, cfg: GistEmbeddingConfig, base: Fingerprint, limits: Limits) -> None:
    k = require_virtual_tokens(cfg.num_gist_tokens, limits, "num_gist_tokens")
    require_tensors(tensors, {"gist_embeddings"})
    require_shape(tensors, "gist_embeddings", (k, base.hidden_size))


def embedding_serving_form(tensors: Tensors, cfg: GistEmbeddingConfig) -> SoftPrompt:
    """A gist-embedding artifact is not a prompt; served alone it acts as an embedding prefix."""
    gists = tensors["gist_embeddings"]  # [k, d]
    return SoftPrompt(embeds=gists, next_position=int(gists.shape[0]))


@dataclass(frozen=True)
class GistCompressorConfig:
    num_gist_tokens: int
    rank: int
    alpha: float
    target_modules: list[str]


COMPRESSOR_TARGETS = ("q_proj", "k_proj", "v_proj")
MAX_RANK = 256


def validate_compressor(
    tensors: Tensors, cfg: GistCompressorConfig, base: Fingerprint, limits: Limits
) -> None:
    """gist_embeddings [k, d]; per target t: lora_A.t [L, r, d] and lora_B.t [L, out, r], out = Hkv * Dh for
    k_proj/v_proj and a multiple of Dh for q_proj (its head count is checked against the model at use)."""
    k = require_virtual_tokens(cfg.num_gist_tokens, limits, "num_gist_tokens")
    r = require_int(cfg.rank, "rank", 1, MAX_RANK)
    alpha = cfg.alpha
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha <= 1e4:
        raise ValidationError(
            f"method_config.alpha must be a number in (0, 10000], got {alpha!r}", field="alpha"
        )
    targets = cfg.target_modules
    if not isinstance(targets, list) or not targets or any(t not in COMPRESSOR_TARGETS for t in targets):
        raise ValidationError(
            f"method_config.target_modules must be a non-empty subset of {list(COMPRESSOR_TARGETS)}",
            field="target_modules",
        )
    names = {"gist_embeddings"} | {f"lora_{ab}.{t}" for t in targets for ab in "AB"}
    require_tensors(tensors, names)
    require_shape(tensors, "gist_embeddings", (k, base.hidden_size))
    kv_out = base.num_kv_heads * base.head_dim
    for t in targets:
        require_shape(tensors, f"lora_A.{t}", (base.num_layers, r, base.hidden_size))
        out = int(tensors[f"lora_B.{t}"].shape[1]) if t == "q_proj" else kv_out
        if out <= 0 or out % max(base.head_dim, 1):
            raise ValidationError(
                f"tensor 'lora_B.{t}' rows must be a multiple of head_dim", field=f"lora_B.{t}"
            )
        require_shape(tensors, f"lora_B.{t}", (base.num_layers, out, r))


def compressor_serving_form(tensors: Tensors, cfg: GistCompressorConfig) -> SoftPrompt:
    """A compressor is not a prompt; served alone it acts as its gist embeddings (like gist_embedding)."""
    gists = tensors["gist_embeddings"]  # [k, d]
    return SoftPrompt(embeds=gists, next_position=int(gists.shape[0]))


METHOD = register(Method("gist", GistConfig, validate, to_serving_form))
COMPRESSOR_METHOD = register(
    Method("gist_compressor", GistCompressorConfig, validate_compressor, compressor_serving_form)
)
EMBEDDING_METHOD = register(
    Method("gist_embedding", GistEmbeddingConfig, validate_embedding, embedding_serving_form)
)
