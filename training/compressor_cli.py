"""`softserve-train compressor`: train a gist compressor (training/methods/gist_compressor.py) and export it
as a `gist_compressor` artifact.

Each --data file is one task: its records' distinct `instruction` values are paraphrases of one another
(every record's answer must follow any of them). The built-in templated tasks (training/gist_tasks.py) are
mixed in unless --no-templated: a compressor learns to compress instructions from many tasks, not one.
A compressed task reads requests as the compressor was trained: `prompt` = "\\nInput: <text>\\nOutput:".

Push the artifact (`softserve-train push`) and compress with it on the server
(`POST /tasks/{id}/compress {"compressor": ...}`), or locally with `softserve-train compress
--gist-embeddings OUT/artifact.safetensors`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from prompt_store import save, to_bytes
from training.data import load_jsonl
from training.gist_tasks import GistTask, build_tasks


def add_parser(sub: Any, add_model_args: Any) -> None:
    p = sub.add_parser(
        "compressor",
        help="train a gist compressor (gist tokens + LoRA) on many tasks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data",
        action="append",
        default=[],
        help='JSONL of {"instruction","input","output"}: one task per file, its instructions paraphrases '
        "(repeat for more tasks)",
    )
    p.add_argument("--no-templated", action="store_true", help="train on the --data tasks only")
    p.add_argument("--task-id", default="gist-compressor", help="artifact task id (%(default)s)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<task-id>)")
    add_model_args(p)
    g = p.add_argument_group("compressor")
    g.add_argument("--num-gist-tokens", type=int, default=4, help="gist tokens k (%(default)s)")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank on q/k/v (%(default)s)")
    g.add_argument("--steps", type=int, default=200, help="optimizer steps (%(default)s)")
    g.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (%(default)s)")
    g.add_argument("--distill", type=float, default=0.5, help="weight of the KL to the full instruction")
    g.add_argument("--tasks-per-step", type=int, default=2, help="tasks per optimizer step (%(default)s)")
    g.add_argument("--examples-per-task", type=int, default=4, help="examples per task and step")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag}: must be at least 1, got {getattr(args, name)}")


def file_task(path: str) -> GistTask:
    """One --data file as a task: its distinct instructions (in first-seen order) and its examples."""
    records = load_jsonl(path)
    missing = sum(1 for r in records if not r.instruction)
    if not records or missing:
        n = len(records)
        raise ValueError(f"--data {path}: every record needs an `instruction` ({missing} of {n} lack one)")
    instructions = tuple(dict.fromkeys(r.instruction for r in records))
    examples = tuple((r.input, r.output) for r in records)
    return GistTask(Path(path).stem, instructions, examples, hold_out_last=False)


def run(args: argparse.Namespace) -> int:
    _positive(args, "num_gist_tokens", "rank", "steps", "tasks_per_step", "examples_per_task")
    if not args.data and args.no_templated:
        raise ValueError("--no-templated: needs at least one --data task")
    tasks = [file_task(p) for p in args.data]  # read before the model loads: a bad file fails fast

    from training.loop import plot_losses
    from training.methods.gist_compressor import CompressorConfig, train_compressor
    from training.model import load_model
    from training.pipeline import ARTIFACT_NAME

    if not args.no_templated:
        texts = [x for t in tasks for x, _ in t.examples]
        # every paraphrase is trained on here: the held-out one is for the benchmark's evaluation
        templated = [replace(t, hold_out_last=False) for t in build_tasks(texts, seed=args.seed)]
        tasks = [*templated, *tasks]
    out = Path(args.out or f"runs/{args.task_id}")
    cfg = CompressorConfig(
        num_gist_tokens=args.num_gist_tokens,
        rank=args.rank,
        alpha=2.0 * args.rank,
        lr=args.lr,
        steps=args.steps,
        tasks_per_step=args.tasks_per_step,
        examples_per_task=args.examples_per_task,
        distill=args.distill,
        n_eval=0,
        seed=args.seed,
    )
    lm = load_model(args.model, args.dtype, args.device)
    comp, losses = train_compressor(lm.runner, tasks, cfg, progress=not args.no_progress)
    artifact = comp.to_artifact(lm.runner, args.task_id, notes=f"{len(tasks)} tasks, {args.steps} steps")
    out.mkdir(parents=True, exist_ok=True)
    path = save(artifact, out / ARTIFACT_NAME)
    log = {
        "config": cfg.method_config() | {"lr": cfg.lr, "steps": cfg.steps, "distill": cfg.distill},
        "tasks": {t.name: len(t.train_instructions) for t in tasks},
        "losses": losses,
    }
    (out / "log.json").write_text(json.dumps(log, indent=1))
    plot_losses(losses, out / "loss.png", f"gist_compressor k={cfg.num_gist_tokens}")
    summary = {
        "artifact": str(path),
        "method": artifact.manifest.method,
        "task_id": args.task_id,
        "tasks": len(tasks),
        "trainable_params": sum(p.numel() for p in comp.trainable()),
        "artifact_bytes": len(to_bytes(artifact)),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }
    print(json.dumps(summary, indent=1))
    return 0
