"""Methods benchmark: train all five soft-prompt methods on SmolLM2-135M-Instruct on shipped recipes (CPU).

For each task: the bare model (no prompt) is scored once, then prompt tuning, P-tuning, prefix tuning and
ACCEPT (with SCAP) are each trained on the task's train split and scored on its held-out split through the
exported artifact's serving form (greedy, exact match + ROUGE-L). Gist embeddings are trained once on the
mixture of all tasks; each task's instruction is then compressed into a `gist` artifact and compared with
the bare model given no instruction (negative control) and the full instruction (positive control).

Writes bench/results/methods.md (+ .json). The defaults fit in about 30 minutes on 2 CPU cores;
--smoke runs tiny step counts to check the plumbing (written to methods-smoke.md unless --out is given).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common.run_log import log, over_budget  # noqa: E402
from prompt_store import to_bytes, to_serving_form  # noqa: E402
from training.eval import EvalResult, evaluate, evaluate_gist  # noqa: E402
from training.loop import TrainConfig  # noqa: E402
from training.methods import compress  # noqa: E402
from training.model import LoadedModel, load_model  # noqa: E402
from training.pipeline import DataSplit, TaskRunConfig, load_split, train_task  # noqa: E402
from training.recipes.make_recipes import recipe_path  # noqa: E402

# (method, learning rate, options); lrs picked for a short CPU budget, not tuned per task.
# ACCEPT uses the same prompt length as prompt tuning (m=8) with fewer trainable parameters:
# SCPP 8*8*4 weights + 4*576 codebook = 2,560, SCAP 4*4*2 + 2*576 = 1,184, total 3,744 vs 8*576 = 4,608.
# Its codebooks start from a per-subspace rank-4 SVD of the instruction's token embeddings (prompt tuning's
# text init, factorised); the mixing weights get a larger lr than the codebook (our choice: the reference
# trains SCPP at one lr and SCAP at its own, training.methods.accept).
# ACCEPT runs right after prompt tuning (its reference) so a tight time budget never skips it.
PLANS: list[tuple[str, float, dict[str, Any]]] = [
    ("prompt_tuning", 3e-2, {"num_virtual_tokens": 8, "init": "text"}),
    (
        "accept",
        3e-2,
        {"num_virtual_tokens": 8, "num_subspaces": 8, "num_codewords": 4, "init": "text"}
        | {"weight_lr": 1e-1, "codebook_lr": 3e-2}
        | {"added_length": 4, "added_subspaces": 4, "added_codewords": 2},
    ),
    ("p_tuning", 1e-2, {"num_virtual_tokens": 8, "encoder_type": "mlp", "encoder_hidden_size": 256}),
    ("prefix_tuning", 3e-3, {"num_virtual_tokens": 8, "projection_hidden_size": 256}),
]
GIST = ("gist", 1e-2, {"num_gist_tokens": 2})


@dataclass
class Row:
    task: str
    method: str
    params: int
    artifact_bytes: int
    before: EvalResult
    after: EvalResult
    train_s: float
    first_loss: float
    last_loss: float
    extra: dict[str, Any] = field(default_factory=dict)


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def mean_tail(losses: list[float], n: int = 5) -> float:
    return sum(losses[-n:]) / len(losses[-n:])


@dataclass
class Bench:
    """Run state; results are rewritten after every row, so an interrupted run still leaves a table."""

    args: argparse.Namespace
    lm: LoadedModel
    splits: dict[str, DataSplit]
    rows: list[Row] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    before: dict[str, EvalResult] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)

    def train_cfg(self, steps: int, lr: float) -> TrainConfig:
        bs = self.args.batch_size
        return TrainConfig(
            steps=steps, batch_size=bs, lr=lr, warmup_steps=max(1, steps // 10), progress=False
        )

    def evaluate(self, data: DataSplit, prompt: Any = None) -> EvalResult:
        return evaluate(
            self.lm.model, self.lm.tokenizer, data.eval, prompt, batch_size=self.args.eval_batch_size
        )

    def over_budget(self, what: str) -> bool:
        return over_budget(self.t0, self.args.budget_min, self.skipped, what)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        self.write()

    def write(self) -> str:
        order = [*(p[0] for p in PLANS), "gist"]
        self.rows.sort(key=lambda r: (self.args.tasks.index(r.task), order.index(r.method)))
        text = markdown(self, time.monotonic() - self.t0)
        out: Path = self.args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        payload = [
            {k: v for k, v in r.__dict__.items() if k not in ("before", "after", "extra")}
            | {"before": r.before.to_dict(), "after": r.after.to_dict()}
            | {k: (v.to_dict() if isinstance(v, EvalResult) else v) for k, v in r.extra.items()}
            for r in self.rows
        ]
        out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
        return text


def run_method(bench: Bench, method: str, lr: float, opts: dict[str, Any], task: str) -> None:
    """Train one method on one task, score its artifact's serving form against the bare model."""
    data = bench.splits[task]
    if opts.get("init") == "text":  # prompt tuning and ACCEPT start from the task's instruction
        opts = opts | {"init_text": data.train[0].instruction}
    t0 = time.monotonic()
    run = train_task(bench.lm, data, TaskRunConfig(method, task, bench.train_cfg(bench.args.steps, lr), opts))
    secs = time.monotonic() - t0
    after = bench.evaluate(data, to_serving_form(run.artifact))
    before, losses = bench.before[task], run.result.losses
    row = Row(
        task,
        method,
        run.method.num_trainable(),
        len(to_bytes(run.artifact)),
        before,
        after,
        secs,
        losses[0],
        mean_tail(losses),
    )
    bench.add(row)
    log(
        f"{task}/{method}: loss {losses[0]:.3f} -> {row.last_loss:.3f} in {secs:.0f} s, "
        f"exact match {pct(before.exact_match)} -> {pct(after.exact_match)}"
    )


def run_gist(bench: Bench) -> None:
    """Train gist embeddings on the task mixture; per task compress its instruction and run the controls."""
    method, lr, opts = GIST
    lm = bench.lm
    mixed = DataSplit([r for s in bench.splits.values() for r in s.train], [])
    t0 = time.monotonic()
    cfg = TaskRunConfig(method, "gist-embeddings", bench.train_cfg(bench.args.gist_steps, lr), opts)
    run = train_task(lm, mixed, cfg)
    secs, losses = time.monotonic() - t0, run.result.losses
    log(f"gist: loss {losses[0]:.3f} -> {mean_tail(losses):.3f} in {secs:.0f} s")
    for task, data in bench.splits.items():
        res = evaluate_gist(
            lm.model,
            lm.tokenizer,
            run.artifact,
            data.eval,
            model_name=lm.name,
            batch_size=bench.args.eval_batch_size,
        )
        gist_art = compress(
            lm.model, lm.tokenizer, run.artifact, data.eval[0].instruction, task_id=task, model_name=lm.name
        )
        extra = {
            "positive": res["positive_control"],
            "embedding_bytes": len(to_bytes(run.artifact)),
            "next_position": gist_art.manifest.method_config["next_position"],
        }
        bench.add(
            Row(
                task,
                "gist",
                run.method.num_trainable(),
                len(to_bytes(gist_art)),
                res["negative_control"],
                res["gist"],
                secs,
                losses[0],
                mean_tail(losses),
                extra,
            )
        )
        neg, gist, pos = (pct(res[k].exact_match) for k in ("negative_control", "gist", "positive_control"))
        log(f"{task}/gist: no instruction {neg}, gist {gist}, full instruction {pos}")


def markdown(bench: Bench, total_s: float) -> str:
    args, lm, rows = bench.args, bench.lm, bench.rows
    lines = [
        f"# methods benchmark: five soft-prompt methods on {lm.name} ({args.device})",
        "",
        f"- model: {lm.name} (float32, {args.device}); torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads; {platform.machine()}, {os.cpu_count()} cores",
        f"- tasks: {', '.join(args.tasks)} (shipped recipes, training/recipes/); held-out split 10% per "
        f"task, capped at {args.eval_size}; greedy decoding through the exported artifact's serving form",
        f"- training: {args.steps} steps per method and task (gist: {args.gist_steps} steps on the mixture "
        f"of all tasks), batch {args.batch_size}, AdamW, linear warmup/decay; total wall time "
        f"{total_s / 60:.1f} min"
        + (" — **SMOKE RUN: tiny step counts, not meaningful**" if args.smoke else ""),
        "- before = bare model, no prompt; for gist, before = no instruction (negative control) and the last "
        "column is the full instruction in the request (positive control)",
        "- artifact bytes = the safetensors file the server loads (gist: the compressed instruction; the "
        "trained gist embeddings are a separate artifact)",
        "",
        "| task | method | trainable params | artifact bytes | exact match before | exact match after "
        "| ROUGE-L before | ROUGE-L after | loss first → last | train s | gist positive control |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        pos = r.extra.get("positive")
        lines.append(
            f"| {r.task} | {r.method} | {r.params:,} | {r.artifact_bytes:,} | {pct(r.before.exact_match)} | "
            f"{pct(r.after.exact_match)} | {r.before.rouge_l:.3f} | {r.after.rouge_l:.3f} | "
            f"{r.first_loss:.2f} → {r.last_loss:.2f} | {r.train_s:.0f} | "
            + (f"{pct(pos.exact_match)} (ROUGE-L {pos.rouge_l:.3f})" if pos else "")
            + " |"
        )
    if bench.skipped:
        lines += ["", f"**skipped (time budget {args.budget_min:.0f} min):** {', '.join(bench.skipped)}"]
    lines += ["", "## sample predictions (first held-out examples)", ""]
    for r in rows:
        s = r.after.samples[:2]
        shown = "; ".join(f"{x['input']!r} → {x['prediction']!r} (want {x['reference']!r})" for x in s)
        lines.append(f"- {r.task}/{r.method}: {shown}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="sentiment,dates", help="comma-separated recipes (%(default)s)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per method and task (%(default)s)")
    p.add_argument("--gist-steps", type=int, default=60, help="gist steps on the task mixture (%(default)s)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-size", type=int, default=24, help="held-out examples per task (%(default)s)")
    p.add_argument(
        "--budget-min", type=float, default=28.0, help="skip remaining runs after this (%(default)s)"
    )
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--methods", default="all", help="comma-separated subset of the five (default: all)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (%(default)s)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="2 steps, 4 eval examples: checks the plumbing only")
    p.add_argument("--out", default=None, help="markdown path (default bench/results/methods.md)")
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.smoke:
        args.steps, args.gist_steps, args.eval_size, args.batch_size = 2, 2, 4, 2
    default = "methods-smoke.md" if args.smoke else "methods.md"
    args.out = Path(args.out) if args.out else ROOT / "bench" / "results" / default
    return args


def main(argv: list[str] | None = None) -> int:
    global PLANS
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    wanted = None if args.methods == "all" else set(args.methods.split(","))
    PLANS = [p for p in PLANS if wanted is None or p[0] in wanted]
    lm = load_model(args.model, device=args.device)
    log(f"loaded {lm.name}")
    bench = Bench(args, lm, {t: load_split([recipe_path(t)], 0.1, 0, args.eval_size) for t in args.tasks})
    for task, data in bench.splits.items():
        bench.before[task] = base = bench.evaluate(data)
        log(f"{task}: bare model exact match {pct(base.exact_match)} on {base.n} held-out examples")
    if (wanted is None or "gist" in wanted) and not bench.over_budget("gist"):
        run_gist(bench)
    for method, lr, opts in PLANS:  # method-major: every method gets its first task before any gets a second
        for task in args.tasks:
            if not bench.over_budget(f"{task}/{method}"):
                run_method(bench, method, lr, opts, task)
    print(bench.write())
    log(f"wrote {args.out} in {(time.monotonic() - bench.t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
