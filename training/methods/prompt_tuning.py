"""Prompt tuning (Lester et al. 2021): m trainable embeddings prepended to the input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from training.data import Batch
from training.lm import prompt_prefix_loss
from training.methods.base import TrainableMethod, hidden_size, sample_vocab_rows, vocab_embeddings

INITS = ("random", "vocab", "text")


@dataclass(frozen=True)
class PromptTuningTrainConfig:
    num_virtual_tokens: int = 8
    init: str = "vocab"  # random | vocab (sampled token embeddings) | text (embeddings of init_text)
    init_text: str = ""
    seed: int = 0


def initial_prompt(model: Any, tokenizer: Any, cfg: PromptTuningTrainConfig) -> torch.Tensor:
    """The starting prompt [m, d] for the chosen init."""
    if cfg.init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {cfg.init!r}")
    gen = torch.Generator().manual_seed(cfg.seed)
    m, d = cfg.num_virtual_tokens, hidden_size(model)
    if cfg.init == "random":
        std = float(vocab_embeddings(model).std())
        return torch.randn(m, d, generator=gen) * std  # [m, d]
    if cfg.init == "vocab":
        return sample_vocab_rows(model, m, gen)  # [m, d]
    if not cfg.init_text:
        raise ValueError("init='text' needs init_text")
    ids = tokenizer(cfg.init_text, add_special_tokens=False)["input_ids"]
    reps = -(-m // len(ids))
    ids = torch.tensor((list(ids) * reps)[:m])  # [m]
    return vocab_embeddings(model)[ids].clone()  # [m, d]


class PromptTuning(TrainableMethod):
    method = "prompt_tuning"

    def __init__(self, model: Any, tokenizer: Any, config: PromptTuningTrainConfig) -> None:
        super().__init__()
        self.config = config
        self.prompt = nn.Parameter(initial_prompt(model, tokenizer, config))  # [m, d]

    def forward(self, model: Any, batch: Batch) -> torch.Tensor:
        return prompt_prefix_loss(model, batch, self.prompt)

    def method_config(self) -> dict[str, Any]:
        return {"num_virtual_tokens": self.config.num_virtual_tokens, "init": self.config.init}

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt": self.prompt}  # [m, d]
