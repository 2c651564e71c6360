"""Gist tokens (Mu et al. 2023): k learned embeddings that compress an instruction into a KV prefix.

Training rows are [instruction][k gists][request][answer] with the LM frozen under the gist mask: the gists
see the instruction; everything after the gists sees only the gists and itself, never the instruction, so
the answer can only use the instruction through the gists' keys/values. `compress` runs instruction + gists
once and keeps the gist positions' keys/values as a `gist` artifact (the request continues at n + k).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from prompt_store import Artifact, Fingerprint, make_artifact
from training.data import Batch, Formatter, Tokenized, collate_gist
from training.lm import (
    additive_mask,
    embed_tokens,
    gist_allowed,
    layer_kv,
    lm_loss,
    model_device,
    model_dtype,
)
from training.methods.base import TrainableMethod, hidden_size, vocab_embeddings


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


@torch.no_grad()
def gist_kv(
    model: Any, instruction_ids: Sequence[int], gists: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run [instruction][gists] once (causal) -> the gist positions' keys, values [L, Hkv, k, Dh]."""
    device = model_device(model)
    ids = torch.tensor([list(instruction_ids)], dtype=torch.long, device=device)  # [1, n]
    embeds = torch.cat(
        [embed_tokens(model, ids), gists.to(device, model_dtype(model))[None]], dim=1
    )  # [1, n+k, d]
    n, k = ids.shape[1], gists.shape[0]
    cache = DynamicCache(config=model.config)
    model.base_model(
        inputs_embeds=embeds,  # [1, n+k, d]
        attention_mask=torch.ones(1, n + k, dtype=torch.long, device=device),  # [1, n+k]
        position_ids=torch.arange(n + k, device=device)[None],  # [1, n+k]
        cache=cache,
        use_cache=True,
    )
    layers = [layer_kv(cache, i) for i in range(len(cache.layers))]  # [1, Hkv, n+k, Dh] each
    keys = torch.stack([key[0, :, n:] for key, _ in layers])  # [L, Hkv, k, Dh]
    values = torch.stack([value[0, :, n:] for _, value in layers])  # [L, Hkv, k, Dh]
    return keys, values


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
    """Compress `instruction` into a `gist` artifact: gist KV [L, Hkv, k, Dh] + next_position = n + k."""
    if isinstance(gist_embeddings, Artifact):
        gist_embeddings = gist_embeddings.tensors["gist_embeddings"]
    gists = gist_embeddings.detach()  # [k, d]
    ids = Formatter(tokenizer).instruction_ids(instruction)
    keys, values = gist_kv(model, ids, gists)  # [L, Hkv, k, Dh] each
    k = int(gists.shape[0])
    cfg = {
        "num_gist_tokens": k,
        "next_position": len(ids) + k,
        "instruction": instruction if keep_instruction else "",
    }
    base = Fingerprint.from_model(model, model_name)
    tensors = {"keys": keys.to(dtype), "values": values.to(dtype)}
    return make_artifact(task_id, "gist", cfg, tensors, base)
