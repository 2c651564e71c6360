"""One training run end to end: records -> split -> tokens -> trainer -> loop -> artifact (+ eval)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prompt_store import Artifact, save, validate_artifact
from training.data import Formatter, Record, load_jsonl, pad_token_id, split, tokenize
from training.eval import EvalResult, evaluate_artifact
from training.loop import TrainConfig, TrainResult, train
from training.methods import build
from training.methods.base import TrainableMethod
from training.model import LoadedModel

ARTIFACT_NAME = "artifact.safetensors"


@dataclass
class DataSplit:
    train: list[Record]
    eval: list[Record]


@dataclass
class TaskRun:
    """What a run produced: the trainer, its artifact (and where it was saved), losses, eval results."""

    method: TrainableMethod
    artifact: Artifact
    result: TrainResult
    data: DataSplit
    artifact_path: Path | None = None
    evaluation: dict[str, EvalResult] = field(default_factory=dict)


def load_split(
    paths: Sequence[str | Path], eval_fraction: float = 0.1, seed: int = 0, max_eval: int | None = None
) -> DataSplit:
    """Each file is split on its own (so every task is represented in eval), then concatenated."""
    train_recs: list[Record] = []
    eval_recs: list[Record] = []
    for path in paths:
        tr, ev = split(load_jsonl(path), eval_fraction, seed, max_eval)
        train_recs += tr
        eval_recs += ev
    return DataSplit(train_recs, eval_recs)


@dataclass(frozen=True)
class TaskRunConfig:
    """What one run trains and how: the method (and its options), the task id, the loop's settings, where
    to save, and what to do after training (export dtype, evaluation)."""

    method_name: str
    task_id: str
    train_cfg: TrainConfig
    method_options: Mapping[str, Any] = field(default_factory=dict)
    out_dir: str | Path | None = None
    resume: bool = False
    chat: bool | None = None  # None: the chat template when the tokenizer has one; False: raw text
    system_prompt: str | None = None  # chat only: the system message trained under (None: the template's)
    max_length: int = 512
    export_dtype: torch.dtype = torch.float32
    run_eval: bool = False
    max_new_tokens: int | None = None
    # after every optimizer step: (step, loss); raising stops the run (fine-tuning jobs: progress, cancel)
    on_step: Callable[[int, float], None] | None = None


def train_task(lm: LoadedModel, data: DataSplit, cfg: TaskRunConfig) -> TaskRun:
    """Train one method on one task; saves `artifact.safetensors` (+ log, loss curve, eval) under out_dir."""
    chat, out_dir = cfg.chat, cfg.out_dir
    fmt = Formatter(lm.tokenizer, chat, cfg.system_prompt)  # checked before any work
    examples = tokenize(data.train, lm.tokenizer, chat, cfg.max_length, cfg.system_prompt)
    method = build(cfg.method_name, lm.model, lm.tokenizer, **cfg.method_options)
    pad = pad_token_id(lm.tokenizer)
    result = train(method, lm.model, examples, cfg.train_cfg, pad, out_dir, cfg.resume, cfg.on_step)
    base = lm.fingerprint()
    artifact = method.export(
        cfg.task_id,
        base,
        dtype=cfg.export_dtype,
        notes=f"trained by softserve-train ({cfg.method_name})",
        input_format=fmt.input_format,  # the format `tokenize` trained on
    )
    validate_artifact(artifact, base)
    run = TaskRun(method=method, artifact=artifact, result=result, data=data)
    if os.environ.get("RANK", "0") != "0":  # other ranks of a distributed run: rank 0 saves and evaluates
        return run
    if out_dir is not None:
        run.artifact_path = save(artifact, Path(out_dir) / ARTIFACT_NAME)
    if cfg.run_eval and data.eval:
        run.evaluation = evaluate_artifact(
            lm.model,
            lm.tokenizer,
            artifact,
            data.eval,
            chat=fmt.chat,
            system_prompt=cfg.system_prompt,
            max_new_tokens=cfg.max_new_tokens,
            model_name=lm.name,
        )
        if out_dir is not None:
            report = {k: v.to_dict() for k, v in run.evaluation.items()}
            (Path(out_dir) / "eval.json").write_text(json.dumps(report, indent=1))
    return run
