"""A learnable gist compressor (Mu et al. 2023's objective, with the fine-tuning moved into a compressor):
k gist embeddings plus a LoRA adapter (PEFT) on the attention projections, active only while an instruction
is compressed. The serving LM stays frozen: it attends to the gists' keys/values instead of the instruction.

Loss per example (instruction I, request x, target y):
- cross-entropy of y under the frozen LM given [gist KV of I][x] (request positions continue at n + k, as
  the server serves a `gist` artifact), plus
- `distill` x KL(teacher || student) on the target positions, the teacher being the same frozen LM reading
  [I][x] in full: a dense signal that asks the gists to carry what reading the instruction changes, which
  is the paper's "as if it had read the instruction" (cross-entropy alone also rewards fitting y beyond it).

The KV is computed by runtime.gist.gist_kv_forward on the compressor view (runtime.gist.compressor_view) -
the same function and the same view the server's compress runs, so training and serving agree.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from prompt_store import Artifact, make_artifact
from runtime.gist import COMPRESSOR_METHOD, compressor_view, gist_kv_forward, instruction_ids, lora_tensors
from runtime.model_runner import KV, ModelRunner
from training.gist_tasks import GistTask, prompt_text, target_text, train_examples
from training.lm import kv_cache


@dataclass(frozen=True)
class CompressorConfig:
    num_gist_tokens: int = 4
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    lr: float = 2e-3
    steps: int = 200
    tasks_per_step: int = 2
    examples_per_task: int = 4
    distill: float = 0.5
    n_eval: int = 24  # examples per task kept out of training
    seed: int = 0

    def method_config(self) -> dict[str, Any]:
        return {
            "num_gist_tokens": self.num_gist_tokens,
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": list(self.target_modules),
        }


def request_ids(runner: ModelRunner, prompt: str) -> list[int]:
    """A plain `prompt` as the server encodes it (the tokenizer's own special tokens)."""
    return [int(i) for i in runner.tokenizer(prompt, add_special_tokens=True)["input_ids"]]


def target_ids(runner: ModelRunner, target: str) -> list[int]:
    return [int(i) for i in runner.tokenizer(target, add_special_tokens=False)["input_ids"]]


def row_logits(
    runner: ModelRunner,
    rows: Sequence[list[int]],
    kv: KV | None = None,
    start: int = 0,
    prefix: Sequence[int] = (),
    at: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits over right-padded `rows` read after a KV prefix [L, Hkv, m, Dh] (positions continue at
    `start`) or after `prefix` ids (shared by every row); no prefix: the rows alone. Gradients flow.

    at: (row [N], column [N]) -> logits [N, V] at those row positions only (the LM head runs there only);
    None -> each row's last real position, [B, V]."""
    model, device = runner.model, runner.device
    pre = list(prefix)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), len(pre) + width), runner.pad_id, dtype=torch.long)  # [B, P + T]
    mask = torch.zeros(len(rows), len(pre) + width, dtype=torch.long)  # [B, P + T]
    for b, r in enumerate(rows):
        ids[b, : len(pre) + len(r)] = torch.tensor(pre + list(r))
        mask[b, : len(pre) + len(r)] = 1
    B, T = ids.shape
    cache, m = None, 0
    if kv is not None:
        m = int(kv[0].shape[2])
        cache = kv_cache(model, kv[0], kv[1], B)
        mask = torch.cat([torch.ones(B, m, dtype=torch.long), mask], dim=1)  # [B, m + T]
    positions = (torch.arange(T) + (start if kv is not None else 0))[None].expand(B, -1)  # [B, T]
    out = model.get_decoder()(
        input_ids=ids.to(device),  # [B, T]
        attention_mask=runner.attention_mask(mask.to(device), T),  # [B, m + T]
        position_ids=positions.to(device),  # [B, T]
        cache=cache,
        use_cache=cache is not None,
    )
    hidden = out.last_hidden_state[:, len(pre) :]  # [B, width, d]
    if at is None:
        at = (torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows]))
    logits: torch.Tensor = model.get_output_embeddings()(hidden[at[0], at[1]]).float()  # [N, V]
    return logits


def target_positions(
    reqs: Sequence[list[int]], tgts: Sequence[list[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of the logits that predict each target token in rows [req][tgt]: [N] each."""
    rows, cols = [], []
    for b, (r, t) in enumerate(zip(reqs, tgts, strict=True)):
        for j in range(len(t)):
            rows.append(b)
            cols.append(len(r) + j - 1)
    return torch.tensor(rows), torch.tensor(cols)


class GistCompressor(nn.Module):
    """Trainable: gist embeddings [k, d] and the LoRA weights of a compressor view of the frozen model."""

    def __init__(self, runner: ModelRunner, config: CompressorConfig) -> None:
        super().__init__()
        self.config = config
        torch.manual_seed(config.seed)
        self.view = compressor_view(runner, config.method_config(), None)
        emb = runner.model.get_input_embeddings().weight.detach().float()  # [V, d]
        gen = torch.Generator().manual_seed(config.seed)
        noise = torch.randn(config.num_gist_tokens, emb.shape[1], generator=gen)  # [k, d]
        self.gist_embeddings = nn.Parameter(emb.mean(0)[None] + noise * float(emb.std()) * 0.1)  # [k, d]

    def trainable(self) -> list[nn.Parameter]:
        return [self.gist_embeddings, *(p for p in self.view.parameters() if p.requires_grad)]

    def gist_kv(self, runner: ModelRunner, instruction: str) -> KV:
        """The gist KV [L, Hkv, k, Dh] of `instruction`, with gradients, and its next_position n + k."""
        return gist_kv_forward(self.view, runner, instruction_ids(runner, instruction), self.gist_embeddings)

    def loss(
        self, runner: ModelRunner, instruction: str, examples: Sequence[tuple[str, str]]
    ) -> torch.Tensor:
        ids = instruction_ids(runner, instruction)
        kv = self.gist_kv(runner, instruction)  # [L, Hkv, k, Dh] each
        reqs = [request_ids(runner, prompt_text(x)) for x, _ in examples]
        tgts = [target_ids(runner, target_text(y)) for _, y in examples]
        rows = [r + t for r, t in zip(reqs, tgts, strict=True)]
        b, c = target_positions(reqs, tgts)  # [N] each
        labels = torch.tensor([tok for t in tgts for tok in t], device=runner.device)  # [N]
        student = row_logits(runner, rows, kv, len(ids) + self.config.num_gist_tokens, at=(b, c))  # [N, V]
        loss = F.cross_entropy(student, labels)
        if self.config.distill > 0:
            with torch.no_grad():
                teacher = row_logits(runner, rows, prefix=ids, at=(b, c))  # [N, V]
            kl = F.kl_div(
                F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean"
            )
            loss = loss + self.config.distill * kl
        return loss

    def to_artifact(self, runner: ModelRunner, task_id: str, notes: str = "") -> Artifact:
        tensors = {"gist_embeddings": self.gist_embeddings.detach().float()}  # [k, d]
        tensors |= lora_tensors(self.view, list(self.config.target_modules))  # [L, r, d] / [L, out, r]
        return make_artifact(
            task_id, COMPRESSOR_METHOD, self.config.method_config(), tensors, runner.fingerprint, notes
        )


def train_compressor(
    runner: ModelRunner,
    tasks: Sequence[GistTask],
    config: CompressorConfig,
    log: Any = None,
    progress: bool = False,
) -> tuple[GistCompressor, list[float]]:
    """Train on `tasks` (their training paraphrases and training examples only); returns (compressor,
    per-step losses). `progress` shows a progress bar with the running loss."""
    comp = GistCompressor(runner, config)
    opt = torch.optim.AdamW(comp.trainable(), lr=config.lr, weight_decay=0.0)
    rng = random.Random(config.seed)
    losses: list[float] = []
    bar = tqdm(total=config.steps, desc="gist_compressor", disable=not progress)
    for step in range(config.steps):
        opt.zero_grad()
        total = 0.0
        for task in rng.sample(list(tasks), min(config.tasks_per_step, len(tasks))):
            pool = train_examples(task, config.n_eval)
            examples = rng.sample(list(pool), min(config.examples_per_task, len(pool)))
            loss = comp.loss(runner, rng.choice(task.train_instructions), examples) / config.tasks_per_step
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(comp.trainable(), 1.0)
        opt.step()
        losses.append(total)
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}")
        if log is not None and (step % 25 == 0 or step == config.steps - 1):
            log(f"step {step}: loss {total:.3f}")
    bar.close()
    return comp, losses
