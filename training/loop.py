"""The shared training loop: fp32 trainable params, AdamW, linear warmup/decay, gradient accumulation,
deterministic data order, checkpoint + resume, tqdm progress, JSON loss log and a PNG loss curve.

Checkpoints (in `<out_dir>/checkpoint/`): `trainable.safetensors` (the method's parameters),
`optimizer.pt` (AdamW state, written with torch.save and read back with weights_only=True) and
`state.json` (step, losses, configs). Training steps use no randomness (no dropout), and the data order is
a pure function of (seed, step), so a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from training.data import Tokenized
from training.lm import model_device
from training.methods.base import TrainableMethod

CHECKPOINT_DIR = "checkpoint"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100  # optimizer steps
    batch_size: int = 8  # examples per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-2
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    seed: int = 0
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end (with out_dir)
    progress: bool = True
    use_accelerate: bool = False  # multi-process / multi-device through `accelerate launch`


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    start_step: int = 0  # > 0 when resumed
    seconds: float = 0.0
    out_dir: Path | None = None


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup over `warmup` steps to 1, then linear decay towards 0 at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


@lru_cache(maxsize=8)
def _permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(int(i) for i in torch.randperm(n, generator=gen))


def batch_indices(n: int, batch_size: int, seed: int, micro_step: int) -> list[int]:
    """Example indices of micro-batch `micro_step`: a reshuffled pass over the data per epoch."""
    out = []
    for p in range(micro_step * batch_size, (micro_step + 1) * batch_size):
        out.append(_permutation(n, seed, p // n)[p % n])
    return out


def make_optimizer(method: TrainableMethod, cfg: TrainConfig) -> torch.optim.AdamW:
    groups = method.param_groups(cfg.lr, cfg.weight_decay)
    for g in groups:
        g["initial_lr"] = g["lr"]
    return torch.optim.AdamW(groups)


def save_checkpoint(
    out_dir: Path, method: TrainableMethod, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> Path:
    """Write the checkpoint to a temp folder, then swap it in (a crash never leaves a half checkpoint)."""
    final = out_dir / CHECKPOINT_DIR
    tmp = out_dir / (CHECKPOINT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    params = {k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()}
    save_file(params, str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    old = out_dir / (CHECKPOINT_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    out_dir: Path, method: TrainableMethod, optimizer: torch.optim.Optimizer
) -> dict[str, Any] | None:
    """Restore parameters and optimizer state; returns the saved state, or None if there is no checkpoint."""
    ckpt = out_dir / CHECKPOINT_DIR
    if not (ckpt / "state.json").is_file():
        return None
    state: dict[str, Any] = json.loads((ckpt / "state.json").read_text())
    if state.get("method") != method.method:
        raise ValueError(f"{ckpt} holds a {state.get('method')!r} run, not {method.method!r}")
    device = next(method.parameters()).device
    method.load_state_dict(
        {k: v.to(device) for k, v in load_file(str(ckpt / "trainable.safetensors")).items()}
    )
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
    return state


def plot_losses(losses: Sequence[float], path: Path, title: str = "") -> Path:
    """A PNG of the training loss per optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _state(
    method: TrainableMethod, cfg: TrainConfig, losses: list[float], log: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "step": len(losses),
        "method": method.method,
        "method_config": method.config_dict(),
        "train_config": dataclasses.asdict(cfg),
        "trainable_params": method.num_trainable(),
        "losses": losses,
        "log": log,
    }


def _write_outputs(out_dir: Path, state: dict[str, Any], title: str) -> None:
    (out_dir / "log.json").write_text(json.dumps(state, indent=1))
    if state["losses"]:
        plot_losses(state["losses"], out_dir / "loss.png", title)


def train(
    method: TrainableMethod,
    model: Any,
    examples: Sequence[Tokenized],
    cfg: TrainConfig,
    pad_id: int = 0,
    out_dir: str | Path | None = None,
    resume: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train `method` against the frozen `model` for cfg.steps optimizer steps."""
    if not examples:
        raise ValueError("no training examples")
    model.requires_grad_(False)
    device = model_device(model)
    method.to(device=device, dtype=torch.float32)
    optimizer = make_optimizer(method, cfg)
    out = Path(out_dir) if out_dir is not None else None
    losses: list[float] = []
    log: list[dict[str, Any]] = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if resume and (saved := load_checkpoint(out, method, optimizer)) is not None:
            losses, log = list(saved["losses"]), list(saved.get("log", []))
    start = len(losses)

    wrapped: Any = method
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward
    rank, world, is_main, reduce = 0, 1, True, (lambda t: t)
    if cfg.use_accelerate:
        from accelerate import Accelerator

        acc = Accelerator(cpu=device.type == "cpu")  # CPU ranks (gloo) when the model was loaded on CPU
        model.to(acc.device)
        device = acc.device
        method.to(device)
        wrapped, optimizer = acc.prepare(method, optimizer)
        backward, rank, world, is_main = (
            acc.backward,
            acc.process_index,
            acc.num_processes,
            acc.is_main_process,
        )
        reduce = lambda t: acc.reduce(t, "mean")  # noqa: E731

    params = [p for p in method.parameters() if p.requires_grad]
    bar = tqdm(total=cfg.steps, initial=start, desc=method.method, disable=not (cfg.progress and is_main))
    t0 = time.monotonic()
    for step in range(start, cfg.steps):
        factor = lr_factor(step, cfg.steps, cfg.warmup_steps)
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * factor
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            idx = batch_indices(
                len(examples), cfg.batch_size * world, cfg.seed, step * cfg.grad_accum + micro
            )
            mine = idx[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
            batch = method.collate([examples[i] for i in mine], pad_id)
            loss = wrapped(model, batch) / cfg.grad_accum  # scalar
            backward(loss)
            total += loss.detach()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        value = float(reduce(total))
        losses.append(value)
        log.append(
            {"step": step + 1, "loss": value, "lr": cfg.lr * factor, "elapsed_s": time.monotonic() - t0}
        )
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}")
        if on_step is not None:
            on_step(step + 1, value)
        if out is not None and is_main and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(out, method, optimizer, _state(method, cfg, losses, log))
    bar.close()
    if out is not None and is_main:
        state = _state(method, cfg, losses, log)
        save_checkpoint(out, method, optimizer, state)
        _write_outputs(out, state, f"{method.method}: training loss")
    return TrainResult(losses=losses, start_step=start, seconds=time.monotonic() - t0, out_dir=out)
