"""Methods on real data: the five soft-prompt methods, prompt tuning and ACCEPT at m=8 and m=60, against
zero-shot (instruction in the request), 4-shot in-context and LoRA (PEFT) on the same frozen base.

Tasks (bench/common/real_data.py, read offline from the `bench` extra's packages): movie-review sentiment,
SMS spam, TREC question type (6 classes) and country -> capital (generation). Trained methods see the bare
input (the soft prompt replaces the instruction); zero-shot and 4-shot get the instruction in the request.
Scores: exact match after normalisation (greedy, the artifact's serving form through the runtime) and, for
classification, label log-likelihood accuracy; mean ± std over seeds; trainable parameters and artifact bytes.

Writes bench/results/methods_real.{md,json,png} (rewritten after every cell; --budget-min skips the rest).
Defaults by device (each flag overrides): on CPU the grid is trimmed to fit 90 min on 2 cores (20 steps of
4, 50 test items per task, 3 seeds, budget 88 min: the recorded run); on CUDA (`--device cuda`, or
`make bench-methods BENCH_ARGS="--device cuda"`) the full grid: 300 steps of 8, 300 test items, 3 seeds.
`--quick` is a plumbing check (1 seed, 2 steps, 8 items).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common.real_data import TASKS, Task, load_task  # noqa: E402
from bench.common.real_eval import few_shot_text, pick_shots, score_groups, train_lora  # noqa: E402
from bench.common.real_report import write_outputs  # noqa: E402
from bench.common.run_log import log, over_budget  # noqa: E402
from bench.methods import GIST, PLANS  # noqa: E402
from prompt_store import to_bytes, to_serving_form  # noqa: E402
from runtime.gist import compress  # noqa: E402
from training.loop import TrainConfig  # noqa: E402
from training.model import LoadedModel, load_model  # noqa: E402
from training.pipeline import DataSplit, TaskRunConfig, train_task  # noqa: E402

_PT = next(p for p in PLANS if p[0] == "prompt_tuning")
_ACC = next(p for p in PLANS if p[0] == "accept")
# (row name, trainer, lr, options): the recipe settings of bench/methods.py, plus m=60 and SCPP alone
SOFT: list[tuple[str, str, float, dict[str, Any]]] = [
    ("prompt_tuning m=8", "prompt_tuning", _PT[1], _PT[2]),
    ("prompt_tuning m=60", "prompt_tuning", _PT[1], _PT[2] | {"num_virtual_tokens": 60}),
    ("accept m=8", "accept", _ACC[1], _ACC[2]),
    ("accept m=60", "accept", _ACC[1], _ACC[2] | {"num_virtual_tokens": 60}),
    ("accept SCPP only m=8", "accept", _ACC[1], _ACC[2] | {"added_length": 0}),
    *[(name, name, lr, opts) for name, lr, opts in PLANS if name in ("p_tuning", "prefix_tuning")],
]
ROWS = ["zero-shot", "4-shot", *(s[0] for s in SOFT), "gist", "lora r=8"]
# run order under a tight budget: the paper's headline comparisons first
ORDER = [
    "zero-shot",
    "4-shot",
    "prompt_tuning m=8",
    "accept m=8",
    "accept SCPP only m=8",
    "lora r=8",
    "prompt_tuning m=60",
    "accept m=60",
    "p_tuning",
    "prefix_tuning",
]
LORA_LR = 5e-4


@dataclass
class Cell:
    """One (task, method): a result per seed."""

    em: list[float] = field(default_factory=list)
    label_acc: list[float] = field(default_factory=list)
    params: int = 0
    artifact_bytes: int = 0
    train_s: list[float] = field(default_factory=list)
    samples: list[dict[str, str]] = field(default_factory=list)

    def stats(self, xs: list[float]) -> tuple[float, float] | None:
        if not xs:
            return None
        return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


@dataclass
class Bench:
    args: argparse.Namespace
    lm: LoadedModel
    tasks: dict[str, Task]
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    def cell(self, task: str, method: str) -> Cell:
        return self.cells.setdefault((task, method), Cell())

    def record(self, task: str, method: str, groups: list[Any], seed_s: float = 0.0, **meta: int) -> None:
        t = self.tasks[task]
        s = score_groups(self.lm.runner, groups, t.labels, self.args.eval_batch_size, self.args.max_new)
        c = self.cell(task, method)
        c.em.append(s.exact_match)
        if s.label_accuracy is not None:
            c.label_acc.append(s.label_accuracy)
        c.samples = s.samples
        c.train_s.append(seed_s)
        for k, v in meta.items():
            setattr(c, k, v)
        acc = "" if s.label_accuracy is None else f", label acc {100 * s.label_accuracy:.1f}%"
        log(f"{task}/{method}: exact match {100 * s.exact_match:.1f}%{acc} ({s.n} items)")
        write_outputs(self)

    def over_budget(self, what: str) -> bool:
        return over_budget(self.t0, self.args.budget_min, self.skipped, what)

    def train_cfg(self, lr: float, seed: int) -> TrainConfig:
        steps = self.args.steps
        return TrainConfig(steps, self.args.batch_size, lr=lr, warmup_steps=max(1, steps // 10), seed=seed)


def run_soft(
    bench: Bench, task: Task, row: str, method: str, lr: float, opts: dict[str, Any], seed: int
) -> None:
    torch.manual_seed(seed)
    opts = opts | {"seed": seed}
    if opts.get("init") == "text":
        opts = opts | {"init_text": task.instructions[0]}
    t0 = time.monotonic()
    cfg = TaskRunConfig(method, task.name, bench.train_cfg(lr, seed), opts)
    run = train_task(bench.lm, DataSplit(task.train, []), cfg)
    secs = time.monotonic() - t0
    prompt = to_serving_form(run.artifact)
    groups = [(prompt, [r.input for r in task.test], task.test)]
    meta = {"params": run.method.num_trainable(), "artifact_bytes": len(to_bytes(run.artifact))}
    bench.record(task.name, row, groups, secs, **meta)


def run_gist(bench: Bench, seed: int) -> None:
    """Gist embeddings trained once on the mixture of all tasks; each test record's instruction compressed."""
    method, lr, opts = GIST
    torch.manual_seed(seed)
    mixed = DataSplit([r for t in bench.tasks.values() for r in t.train], [])
    t0 = time.monotonic()
    cfg = TaskRunConfig(method, "gist-embeddings", bench.train_cfg(lr, seed), opts | {"seed": seed})
    run = train_task(bench.lm, mixed, cfg)
    secs = time.monotonic() - t0
    for task in bench.tasks.values():
        groups, size = [], 0
        for instruction in task.instructions:
            recs = [r for r in task.test if r.instruction == instruction]
            art = compress(bench.lm.runner, run.artifact, instruction, "gist")
            size = len(to_bytes(art))
            groups.append((to_serving_form(art), [r.input for r in recs], recs))
        bench.record(task.name, "gist", groups, secs, params=run.method.num_trainable(), artifact_bytes=size)


def run_lora(bench: Bench, task: Task, seed: int) -> None:
    t0 = time.monotonic()
    lora = train_lora(bench.lm.runner, task.train, bench.args.steps, bench.args.batch_size, LORA_LR, seed)
    secs = time.monotonic() - t0
    groups = [(None, [r.input for r in task.test], task.test)]
    saved, bench.lm.runner = bench.lm.runner, lora.runner
    try:
        meta = {"params": lora.params, "artifact_bytes": lora.artifact_bytes}
        bench.record(task.name, "lora r=8", groups, secs, **meta)
    finally:
        bench.lm.runner = saved


def run_task_seed(bench: Bench, task: Task, seed: int, wanted: set[str]) -> None:
    """Every wanted row of one task and seed, in ORDER (the headline comparisons first)."""
    soft = {s[0]: s for s in SOFT}
    for row in ORDER:
        once = row == "zero-shot" and seed != bench.args.seeds[0]  # deterministic: run on the first seed only
        if row not in wanted or row == "gist" or once or bench.over_budget(f"{task.name}/{row}/seed {seed}"):
            continue
        if row == "zero-shot":
            texts = [f"{r.instruction}\n\n{r.input}" for r in task.test]
            bench.record(task.name, row, [(None, texts, task.test)])
        elif row == "4-shot":
            shots = pick_shots(task.train, task.labels, 4, seed)
            texts = [few_shot_text(r.instruction, shots, r.input) for r in task.test]
            bench.record(task.name, row, [(None, texts, task.test)])
        elif row == "lora r=8":
            run_lora(bench, task, seed)
        else:
            run_soft(bench, task, *soft[row], seed)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated (%(default)s)")
    p.add_argument("--methods", default="all", help=f"comma-separated subset of: {'; '.join(ROWS)}")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (%(default)s)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (CPU 20, CUDA 300)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per step (CPU 4, CUDA 8)")
    p.add_argument("--train-size", type=int, default=2000, help="train records per task, at most")
    p.add_argument("--test-size", type=int, default=None, help="test records per task (CPU 50, CUDA 300)")
    p.add_argument("--eval-batch-size", type=int, default=50)
    p.add_argument("--max-new", type=int, default=8, help="greedy tokens per answer (%(default)s)")
    p.add_argument("--budget-min", type=float, default=None, help="skip later runs after this (CPU 88)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads (%(default)s; 1 on a shared host)")
    p.add_argument("--quick", action="store_true", help="1 seed, 2 steps, 8 test items: plumbing only")
    p.add_argument("--out", default=None, help="markdown path (default bench/results/methods_real.md)")
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    gpu = args.device.startswith("cuda")
    defaults = {"steps": (20, 300), "batch_size": (4, 8), "test_size": (50, 300), "budget_min": (88.0, 600.0)}
    for name, (cpu_value, gpu_value) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, gpu_value if gpu else cpu_value)
    if args.quick:
        args.seeds, args.steps, args.test_size, args.train_size, args.batch_size = [0], 2, 8, 64, 2
        args.max_new = 4
    default = "methods_real-quick.md" if args.quick else "methods_real.md"
    args.out = Path(args.out) if args.out else ROOT / "bench" / "results" / default
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    wanted = set(ROWS) if args.methods == "all" else {m.strip() for m in args.methods.split(",")}
    unknown = wanted - set(ROWS)
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; known: {ROWS}")
    lm = load_model(args.model, device=args.device)
    tasks = {}
    for name in args.tasks:
        t = load_task(name, args.train_size)
        tasks[name] = Task(t.name, t.kind, t.instructions, t.labels, t.train, t.dev, t.test[: args.test_size])
    bench = Bench(args, lm, tasks)
    sizes = ", ".join(f"{t.name} ({len(t.train)}/{len(t.test)})" for t in tasks.values())
    log(f"loaded {lm.name}; tasks (train/test) {sizes}")
    for seed in args.seeds:  # seed-major: an interrupted run still has every method on seed 0
        for task in tasks.values():
            run_task_seed(bench, task, seed, wanted)
        if "gist" in wanted and not bench.over_budget(f"gist/seed {seed}"):
            run_gist(bench, seed)
    write_outputs(bench, final=True)
    log(f"wrote {args.out} in {(time.monotonic() - bench.t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
