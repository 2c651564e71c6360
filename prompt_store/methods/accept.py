"""ACCEPT (Lin et al. 2024): product-quantised soft prompts.

The hidden size d is split into K subspaces of d/K; each subspace has r shared codewords. Prompt vector i is
  p_i = concat_k  sum_j W[i, k, j] * C[k, j, :]          (free weights, no softmax)
SCPP is the prepended prompt [m, d]; SCAP (optional, as in DePT) is an added delta [s, d] on the first s
real input-token embeddings, composed the same way from its own codebook. `added_at` says which tokens:
"user_text" (the user's text, after the chat template's head; what training writes) or "start" (the
request's first tokens; artifacts written before the key existed, which keep that behaviour).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
from prompt_store.types import ADDED_AT_START, ADDED_AT_USER_TEXT, Fingerprint, Limits, SoftPrompt

MAX_CODEWORDS = 4096


@dataclass(frozen=True)
class AcceptConfig:
    num_virtual_tokens: int
    num_subspaces: int
    num_codewords: int
    added_length: int = 0  # s; 0 = no SCAP
    added_subspaces: int = 0
    added_codewords: int = 0
    added_at: str = ADDED_AT_START  # ADDED_AT_START | ADDED_AT_USER_TEXT


def compose(weight: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """weight [n, K, r], codebook [K, r, d/K] -> [n, d] (one linear mix of codewords per subspace)."""
    mixed = torch.einsum("nkr,krc->nkc", weight.float(), codebook.float())  # [n, K, d/K]
    return mixed.reshape(mixed.shape[0], -1).to(codebook.dtype)  # [n, d]


def _check_factorisation(subspaces: int, codewords: int, hidden: int, prefix: str) -> None:
    require_int(subspaces, f"{prefix}subspaces", 1, hidden)
    require_int(codewords, f"{prefix}codewords", 1, MAX_CODEWORDS)
    if hidden % subspaces:
        raise ValidationError(
            f"{prefix}subspaces={subspaces} must divide hidden_size={hidden}", field=f"{prefix}subspaces"
        )


def validate(tensors: Tensors, cfg: AcceptConfig, base: Fingerprint, limits: Limits) -> None:
    d = base.hidden_size
    m = require_virtual_tokens(cfg.num_virtual_tokens, limits)
    _check_factorisation(cfg.num_subspaces, cfg.num_codewords, d, "num_")
    K, r = cfg.num_subspaces, cfg.num_codewords
    s = require_int(cfg.added_length, "added_length", 0, limits.max_virtual_tokens)
    if cfg.added_at not in (ADDED_AT_START, ADDED_AT_USER_TEXT):
        raise ValidationError(
            f"added_at must be {ADDED_AT_START!r} or {ADDED_AT_USER_TEXT!r}, got {str(cfg.added_at)[:40]!r}",
            field="added_at",
        )
    if s:
        _check_factorisation(cfg.added_subspaces, cfg.added_codewords, d, "added_")
        require_tensors(tensors, {"prompt_weight", "prompt_codebook", "added_weight", "added_codebook"})
        Ka, ra = cfg.added_subspaces, cfg.added_codewords
        require_shape(tensors, "added_weight", (s, Ka, ra))
        require_shape(tensors, "added_codebook", (Ka, ra, d // Ka))
    else:
        require_tensors(tensors, {"prompt_weight", "prompt_codebook"})
    require_shape(tensors, "prompt_weight", (m, K, r))
    require_shape(tensors, "prompt_codebook", (K, r, d // K))


def to_serving_form(tensors: Tensors, cfg: AcceptConfig) -> SoftPrompt:
    prompt = compose(tensors["prompt_weight"], tensors["prompt_codebook"])  # [m, d]
    added = None
    if cfg.added_length:
        added = compose(tensors["added_weight"], tensors["added_codebook"])  # [s, d]
    return SoftPrompt(embeds=prompt, next_position=int(prompt.shape[0]), added=added, added_at=cfg.added_at)


METHOD = register(Method("accept", AcceptConfig, validate, to_serving_form))
