"""Prefix tuning (Li & Liang 2021): trained keys/values at every layer, through an MLP reparameterisation.

P[i] = MLP(P'[i]) with P' [m, d] and MLP = Linear(d, h) -> tanh -> Linear(h, L*2*Hkv*Dh) (as in PEFT).
The MLP is training-only: the artifact stores its output as keys/values [L, Hkv, m, Dh]. The model consumes
them as a prefilled cache; input positions continue at m and the attention mask covers prefix + input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prompt_store import Fingerprint, SoftPrompt
from training.data import Batch
from training.lm import kv_prefix_loss
from training.methods.base import TrainableMethod, hidden_size, sample_vocab_rows
from training.model import runner_for


@dataclass(frozen=True)
class PrefixTuningTrainConfig:
    num_virtual_tokens: int = 8
    projection: bool = True  # MLP reparameterisation (Li & Liang); False = train the KV directly
    projection_hidden_size: int = 256
    seed: int = 0


def kv_dims(model: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of the base model."""
    fp = Fingerprint.from_model(model, "")
    return fp.num_layers, fp.num_kv_heads, fp.head_dim


def split_kv(flat: torch.Tensor, layers: int, heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """flat [m, L*2*Hkv*Dh] -> keys, values [L, Hkv, m, Dh] (layout: layer, key/value, head, dim)."""
    m = flat.shape[0]
    kv = flat.view(m, layers, 2, heads, head_dim).permute(2, 1, 3, 0, 4)  # [2, L, Hkv, m, Dh]
    return kv[0], kv[1]  # [L, Hkv, m, Dh] each


def token_kv(model: Any, embeds: torch.Tensor) -> torch.Tensor:
    """The model's own keys/values for a run of embeddings [m, d] (the runtime's `prefix_kv`) -> flat
    [m, L*2*Hkv*Dh] (for init)."""
    keys, values = runner_for(model).prefix_kv(SoftPrompt(embeds=embeds))  # [L, Hkv, m, Dh] each
    kv = torch.stack([keys, values], dim=1)  # [L, 2, Hkv, m, Dh]
    flat = kv.permute(3, 0, 1, 2, 4).reshape(embeds.shape[0], -1)  # [m, L*2*Hkv*Dh]
    return flat.float().cpu().clone()  # a plain tensor (out of inference mode)


class PrefixTuning(TrainableMethod):
    method = "prefix_tuning"

    def __init__(self, model: Any, tokenizer: Any, config: PrefixTuningTrainConfig) -> None:
        super().__init__()
        self.config = config
        self.dims = kv_dims(model)
        L, H, Dh = self.dims
        m, d = config.num_virtual_tokens, hidden_size(model)
        gen = torch.Generator().manual_seed(config.seed)
        rows = sample_vocab_rows(model, m, gen)  # [m, d]
        if config.projection:
            self.inputs = nn.Parameter(rows)  # [m, d]
            with torch.random.fork_rng():
                torch.manual_seed(config.seed)
                h = config.projection_hidden_size
                out = nn.Linear(h, L * 2 * H * Dh)
                out.bias.data.copy_(token_kv(model, rows).mean(dim=0))  # start near real KV magnitudes
                self.mlp: nn.Module | None = nn.Sequential(nn.Linear(d, h), nn.Tanh(), out)
        else:
            self.inputs = nn.Parameter(token_kv(model, rows))  # [m, L*2*Hkv*Dh]
            self.mlp = None

    def flat(self) -> torch.Tensor:
        """P = MLP(P') (or P itself without projection) -> [m, L*2*Hkv*Dh]."""
        return self.inputs if self.mlp is None else self.mlp(self.inputs)  # [m, L*2*Hkv*Dh]

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        return split_kv(self.flat(), *self.dims)  # [L, Hkv, m, Dh] each

    def forward(self, model: Any, batch: Batch) -> torch.Tensor:
        keys, values = self.keys_values()  # [L, Hkv, m, Dh] each
        return kv_prefix_loss(model, batch, keys, values)

    def method_config(self) -> dict[str, Any]:
        return {"num_virtual_tokens": self.config.num_virtual_tokens, "projection": self.config.projection}

    def export_tensors(self) -> dict[str, torch.Tensor]:
        keys, values = self.keys_values()
        return {"keys": keys, "values": values}  # [L, Hkv, m, Dh] each
