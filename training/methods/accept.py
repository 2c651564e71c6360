"""ACCEPT (Lin et al. 2024): product-quantised prompts trained as codebooks + free mixing weights.

SCPP: prompt [m, d] = compose(prompt_weight [m, K, r], prompt_codebook [K, r, d/K]).
SCAP (optional): delta [s, d] = compose(added_weight [s, Ka, ra], added_codebook [Ka, ra, d/Ka]) added to
the first s tokens of the user's text (`added_at = "user_text"`, runtime.input_format).

Learning rates follow the reference code (github.com/AI-Application-and-Integration-Lab/Accept, train.py,
built on DePT by Zhengxiang Shi): two AdamW groups, SCPP (its weights and codebook) at `--learning_rate` and
SCAP (its weights and codebook, DePT's low-rank A/B pair) at its own `--lora_embedding_lr`
(`--added_embedding_lr` in the example scripts), usually far smaller: ACCEPT's scripts search SCAP
1e-4..5e-3 against SCPP 3e-1..5e-1 over 30,000 steps (DePT's README: 5e-4, 5e-3 or 3e-1 against 3e-1).
The reference does not split SCPP's weights from its codebook; `weight_lr` / `codebook_lr` are this
project's own options (both default to the base lr, i.e. the reference's one SCPP lr). `added_lr` defaults
to the base lr x ADDED_LR_RATIO: 1/60 is the top of ACCEPT's own SCAP/SCPP range (5e-3 / 3e-1), taken
because our runs are ~150x shorter (200 steps at 3e-2 give SCAP 5e-4); not tuned on real data here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prompt_store.methods.accept import compose
from prompt_store.types import ADDED_AT_USER_TEXT
from training.data import Batch
from training.lm import prompt_prefix_loss
from training.methods.base import TrainableMethod, hidden_size, sample_vocab_rows, vocab_embeddings

INITS = ("vocab", "text")
ADDED_LR_RATIO = 1 / 60  # SCAP lr / base lr when `added_lr` is not given (module docstring)


@dataclass(frozen=True)
class AcceptTrainConfig:
    num_virtual_tokens: int = 8
    num_subspaces: int = 8  # K, must divide the hidden size
    num_codewords: int = 16  # r
    added_length: int = 0  # s; 0 = no SCAP
    added_subspaces: int = 8
    added_codewords: int = 8
    init: str = "vocab"  # vocab (sampled codewords, one-hot weights) | text (SVD of init_text's embeddings)
    init_text: str = ""
    weight_lr: float | None = None  # lr of SCPP's mixing weights (None: the base lr)
    codebook_lr: float | None = None  # lr of SCPP's codebook (None: the base lr)
    added_lr: float | None = None  # lr of SCAP's weights and codebook (None: base lr x ADDED_LR_RATIO)
    seed: int = 0


def _check_divides(k: int, d: int, name: str) -> None:
    if k < 1 or d % k:
        raise ValueError(f"{name}={k} must divide the hidden size {d}")


def vocab_codebook(model: Any, subspaces: int, codewords: int, gen: torch.Generator) -> torch.Tensor:
    """Codebook [K, r, d/K] cut from r sampled vocabulary embeddings (codeword j of subspace k = slice k)."""
    rows = sample_vocab_rows(model, codewords, gen)  # [r, d]
    return rows.view(codewords, subspaces, -1).transpose(0, 1).contiguous()  # [K, r, d/K]


def one_hot_weights(n: int, subspaces: int, codewords: int, gen: torch.Generator) -> torch.Tensor:
    """Weights [n, K, r] selecting one random codeword per subspace (so each prompt starts token-like)."""
    pick = torch.randint(0, codewords, (n, subspaces), generator=gen)  # [n, K]
    return nn.functional.one_hot(pick, codewords).float()  # [n, K, r]


def text_embeddings(model: Any, tokenizer: Any, text: str, n: int) -> torch.Tensor:
    """The token embeddings of `text`, repeated or cut to n rows (as prompt tuning's text init) -> [n, d]."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("init='text' needs a non-empty init_text")
    reps = -(-n // len(ids))
    return vocab_embeddings(model)[torch.tensor((list(ids) * reps)[:n])].clone().float()  # [n, d]


def text_factors(
    target: torch.Tensor, subspaces: int, codewords: int, filler: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [m, K, r] and codebook [K, r, d/K] whose composition is the best rank-r fit of target [m, d]
    in every subspace (truncated SVD). Weights are scaled to O(1) entries (like one-hot weights), the
    codebook carries the magnitude. Codewords beyond the rank come from `filler` [K, r, d/K] with 0 weight."""
    m, d = target.shape
    K, r = subspaces, codewords
    x = target.view(m, K, d // K).transpose(0, 1)  # [K, m, d/K]
    u, sv, vh = torch.linalg.svd(x, full_matrices=False)  # [K, m, q], [K, q], [K, q, d/K]
    q = min(r, sv.shape[1])
    scale = m**0.5
    weight = torch.zeros(m, K, r)
    weight[:, :, :q] = u[:, :, :q].transpose(0, 1) * scale  # [m, K, q]
    codebook = filler.clone()  # [K, r, d/K]
    codebook[:, :q] = sv[:, :q, None] * vh[:, :q] / scale  # [K, q, d/K]
    return weight, codebook


class Accept(TrainableMethod):
    method = "accept"

    def __init__(self, model: Any, tokenizer: Any, config: AcceptTrainConfig) -> None:
        super().__init__()
        self.config = config
        d = hidden_size(model)
        _check_divides(config.num_subspaces, d, "num_subspaces")
        gen = torch.Generator().manual_seed(config.seed)
        K, r, m = config.num_subspaces, config.num_codewords, config.num_virtual_tokens
        if config.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {config.init!r}")
        codebook = vocab_codebook(model, K, r, gen)  # [K, r, d/K]
        if config.init == "text":
            target = text_embeddings(model, tokenizer, config.init_text, m)  # [m, d]
            weight, codebook = text_factors(target, K, r, codebook)  # [m, K, r], [K, r, d/K]
        else:
            weight = one_hot_weights(m, K, r, gen)  # [m, K, r]
        self.prompt_codebook = nn.Parameter(codebook)  # [K, r, d/K]
        self.prompt_weight = nn.Parameter(weight)  # [m, K, r]
        self.added_codebook: nn.Parameter | None = None
        self.added_weight: nn.Parameter | None = None
        if config.added_length:
            _check_divides(config.added_subspaces, d, "added_subspaces")
            Ka, ra, s = config.added_subspaces, config.added_codewords, config.added_length
            # zero weights: the delta starts at 0 while the codebook still receives gradient via the weights
            self.added_codebook = nn.Parameter(vocab_codebook(model, Ka, ra, gen) * 0.1)  # [Ka, ra, d/Ka]
            self.added_weight = nn.Parameter(torch.zeros(s, Ka, ra))  # [s, Ka, ra]

    def prompt(self) -> torch.Tensor:
        return compose(self.prompt_weight, self.prompt_codebook)  # [m, d]

    def added(self) -> torch.Tensor | None:
        if self.added_weight is None or self.added_codebook is None:
            return None
        return compose(self.added_weight, self.added_codebook)  # [s, d]

    def forward(self, model: Any, batch: Batch) -> torch.Tensor:
        return prompt_prefix_loss(model, batch, self.prompt(), self.added())

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """SCPP (weights, codebook) and SCAP, each group with its own learning rate (module docstring)."""
        cfg = self.config

        def group(name: str, params: list[nn.Parameter], group_lr: float) -> dict[str, Any]:
            return {"params": params, "lr": group_lr, "weight_decay": weight_decay, "name": name}

        groups = [
            group("prompt_weights", [self.prompt_weight], cfg.weight_lr or lr),
            group("prompt_codebook", [self.prompt_codebook], cfg.codebook_lr or lr),
        ]
        if self.added_weight is not None and self.added_codebook is not None:
            added_lr = cfg.added_lr or lr * ADDED_LR_RATIO
            groups.append(group("added", [self.added_weight, self.added_codebook], added_lr))
        return groups

    def method_config(self) -> dict[str, Any]:
        cfg = self.config
        out = {
            "num_virtual_tokens": cfg.num_virtual_tokens,
            "num_subspaces": cfg.num_subspaces,
            "num_codewords": cfg.num_codewords,
            "added_length": cfg.added_length,
        }
        if cfg.added_length:
            out |= {"added_subspaces": cfg.added_subspaces, "added_codewords": cfg.added_codewords}
            out["added_at"] = ADDED_AT_USER_TEXT  # trained on the user text's first tokens (add_delta)
        return out

    def export_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {
            "prompt_weight": self.prompt_weight,
            "prompt_codebook": self.prompt_codebook,
        }
        if self.added_weight is not None and self.added_codebook is not None:
            out |= {"added_weight": self.added_weight, "added_codebook": self.added_codebook}
        return out
