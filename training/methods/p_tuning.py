"""P-tuning (Liu et al. 2021): an MLP or LSTM encoder maps m input embeddings to the prompt.

The encoder is training-only; the artifact stores its output `prompt [m, d]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from training.data import Batch
from training.lm import prompt_prefix_loss
from training.methods.base import TrainableMethod, hidden_size, sample_vocab_rows


@dataclass(frozen=True)
class PTuningTrainConfig:
    num_virtual_tokens: int = 8
    encoder_type: str = "mlp"  # mlp | lstm
    encoder_hidden_size: int = 128
    seed: int = 0


class PTuning(TrainableMethod):
    """Input embeddings [m, d] -> encoder -> prompt [m, d]."""

    method = "p_tuning"

    def __init__(self, model: Any, tokenizer: Any, config: PTuningTrainConfig) -> None:
        super().__init__()
        if config.encoder_type not in ("mlp", "lstm"):
            raise ValueError(f"encoder_type must be 'mlp' or 'lstm', got {config.encoder_type!r}")
        self.config = config
        d, h = hidden_size(model), config.encoder_hidden_size
        gen = torch.Generator().manual_seed(config.seed)
        self.inputs = nn.Parameter(sample_vocab_rows(model, config.num_virtual_tokens, gen))  # [m, d]
        with torch.random.fork_rng():
            torch.manual_seed(config.seed)
            self.lstm = (
                nn.LSTM(d, h, num_layers=2, bidirectional=True, batch_first=True) if self.is_lstm else None
            )
            if self.is_lstm:  # as in PEFT: 2-layer biLSTM, then a 2-layer MLP
                self.mlp = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
            else:  # as in PEFT: 3-layer MLP
                self.mlp = nn.Sequential(
                    nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d)
                )

    @property
    def is_lstm(self) -> bool:
        return self.config.encoder_type == "lstm"

    def prompt(self) -> torch.Tensor:
        """The encoder output [m, d] (what the artifact stores)."""
        x = self.inputs[None]  # [1, m, d]
        if self.lstm is not None:
            x = self.lstm(x)[0]  # [1, m, 2h]
        return self.mlp(x)[0]  # [m, d]

    def forward(self, model: Any, batch: Batch) -> torch.Tensor:
        return prompt_prefix_loss(model, batch, self.prompt())

    def method_config(self) -> dict[str, Any]:
        return {
            "num_virtual_tokens": self.config.num_virtual_tokens,
            "encoder_type": self.config.encoder_type,
            "encoder_hidden_size": self.config.encoder_hidden_size,
        }

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt": self.prompt()}  # [m, d]
