"""Gist tokens (Mu et al. 2023): k learned embeddings that compress an instruction into a KV prefix.

Training rows are [instruction][k gists][request][answer] with the LM frozen under the gist mask: the gists
see the instruction; everything after the gists sees only the gists and itself, never the instruction, so
the answer can only use the instruction through the gists' keys/values. `compress` (the runtime's, see
runtime/gist.py) runs instruction + gists once and keeps the gist positions' keys/values as a `gist`
artifact (the request continues at n + k).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prompt_store import Artifact
from runtime import gist as runtime_gist
from training.data import Batch, Tokenized, collate_gist
from training.lm import additive_mask, embed_tokens, gist_allowed, lm_loss, model_device, model_dtype
from training.methods.base import TrainableMethod, hidden_size, vocab_embeddings
from training.model import runner_for


@dataclass(frozen=True)
class GistTrainConfig:
    num_gist_tokens: int = 2
    seed: int = 0


def place_gists(embeds: torch.Tensor, gists: torch.Tensor, gist_start: torch.Tensor) -> torch.Tensor:
    """Write gists [k, d] into embeds [B, T, d] at positions gist_start[b] .. gist_start[b] + k - 1."""
    B, _, d = embeds.shape
    k = gists.shape[0]
    idx = gist_start.to(embeds.device)[:, None] + torch.arange(k, device=embeds.device)[None]  # [B, k]
    src = gists.to(embeds.dtype)[None].expand(B, -1, -1)  # [B, k, d]
    return embeds.scatter(1, idx[..., None].expand(-1, -1, d), src)  # [B, T, d]


class Gist(TrainableMethod):
    """Trains the gist-token embeddings; exports them as a `gist_embedding` artifact."""

    method = "gist_embedding"

    def __init__(self, model: Any, tokenizer: Any, config: GistTrainConfig) -> None:
        super().__init__()
        self.config = config
        emb = vocab_embeddings(model)  # [V, d]
        gen = torch.Generator().manual_seed(config.seed)
        noise = torch.randn(config.num_gist_tokens, hidden_size(model), generator=gen)  # [k, d]
        self.gist_embeddings = nn.Parameter(emb.mean(0)[None] + noise * float(emb.std()) * 0.1)  # [k, d]

    def collate(self, examples: Sequence[Tokenized], pad_id: int) -> Batch:
        if any(not e.instruction_ids for e in examples):
            raise ValueError("gist training needs an 'instruction' on every record")
        return collate_gist(examples, pad_id, self.config.num_gist_tokens)

    def forward(self, model: Any, batch: Batch) -> torch.Tensor:
        assert batch.gist_start is not None
        device = model_device(model)
        B, T = batch.input_ids.shape
        embeds = place_gists(
            embed_tokens(model, batch.input_ids).float(), self.gist_embeddings, batch.gist_start
        )
        allowed = gist_allowed(batch.lengths, batch.gist_start, batch.num_gist, T)  # [B, T, T]
        mask = additive_mask(allowed, model_dtype(model)).to(device)  # [B, 1, T, T]
        positions = torch.arange(T, device=device)[None].expand(B, -1)  # [B, T]
        return lm_loss(model, embeds, mask, positions, batch.labels)

    def method_config(self) -> dict[str, Any]:
        return {"num_gist_tokens": self.config.num_gist_tokens}

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {"gist_embeddings": self.gist_embeddings}  # [k, d]


def compress(
    model: Any,
    tokenizer: Any,
    gist_embeddings: torch.Tensor | Artifact,
    instruction: str,
    *,
    task_id: str = "gist",
    model_name: str = "",
    dtype: torch.dtype = torch.float32,
    keep_instruction: bool = True,
) -> Artifact:
    """Compress `instruction` into a `gist` artifact (gist KV [L, Hkv, k, Dh] + next_position = n + k) with
    the runtime's `runtime.gist.compress`, the server's own; `model` is a runner or a bare HF model."""
    runner = runner_for(model, tokenizer, model_name)
    return runtime_gist.compress(runner, gist_embeddings, instruction, task_id, keep_instruction, dtype)
