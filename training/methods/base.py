"""The trainer interface: an nn.Module holding ONLY the trainable parameters of one method."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from prompt_store import RAW_FORMAT, Artifact, Fingerprint, InputFormat, make_artifact
from training.data import Batch, Tokenized, collate


class TrainableMethod(nn.Module):
    """Trainable soft-prompt parameters (fp32) for a frozen base model passed to `forward`.

    Subclasses set `method` (the prompt_store method name), keep their frozen config in `self.config`,
    compute the training loss in `forward(model, batch)` and the stored tensors in `export_tensors()`.
    """

    method: ClassVar[str]
    config: Any

    def forward(self, model: Any, batch: Batch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def collate(self, examples: Sequence[Tokenized], pad_id: int) -> Batch:
        """How examples become a batch for this method (gist lays rows out differently)."""
        return collate(examples, pad_id)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW parameter groups; one group by default."""
        return [
            {
                "params": [p for p in self.parameters() if p.requires_grad],
                "lr": lr,
                "weight_decay": weight_decay,
            }
        ]

    def method_config(self) -> dict[str, Any]:  # pragma: no cover - abstract
        """The prompt_store method_config of the exported artifact."""
        raise NotImplementedError

    def export_tensors(self) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def export(
        self,
        task_id: str,
        base: Fingerprint,
        dtype: torch.dtype = torch.float32,
        notes: str = "",
        input_format: InputFormat = RAW_FORMAT,
    ) -> Artifact:
        """The artifact prompt_store validates and the server serves; `input_format`: how the training data
        was formatted (`training.data.Formatter.input_format`), which the server applies to a plain prompt."""
        with torch.no_grad():
            tensors = {k: v.detach().to(dtype) for k, v in self.export_tensors().items()}
        cfg = self.method_config()
        return make_artifact(task_id, self.method, cfg, tensors, base, notes=notes, input_format=input_format)

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def config_dict(self) -> dict[str, Any]:
        """The training config (saved with checkpoints)."""
        return dataclasses.asdict(self.config)


def hidden_size(model: Any) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(cfg.hidden_size)


def vocab_embeddings(model: Any) -> torch.Tensor:
    """The frozen input-embedding matrix [V, d] as fp32 on CPU (used for initialisation only)."""
    return model.get_input_embeddings().weight.detach().float().cpu()  # [V, d]


def sample_vocab_rows(model: Any, n: int, generator: torch.Generator, top: int = 5000) -> torch.Tensor:
    """n embedding rows sampled from the first `top` vocabulary entries (Lester et al.) -> [n, d]."""
    emb = vocab_embeddings(model)  # [V, d]
    ids = torch.randint(0, min(top, emb.shape[0]), (n,), generator=generator)  # [n]
    return emb[ids].clone()  # [n, d]
