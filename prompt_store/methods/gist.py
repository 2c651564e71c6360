"""Gist tokens (Mu et al. 2023): an instruction compressed into the keys/values of k gist tokens.

Two artifact kinds share this family:
- `gist` (this module): the compressed instruction, a KV prefix for the k gist positions plus the
  position the input continues at (instruction length + k, as the gists were computed after it).
- `gist_embedding` (below): the k learned gist-token embeddings used to compress instructions.
"""

from __future__ import annotations

from dataclasses import dataclass

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


METHOD = register(Method("gist", GistConfig, validate, to_serving_form))
EMBEDDING_METHOD = register(
    Method("gist_embedding", GistEmbeddingConfig, validate_embedding, embedding_serving_form)
)
