"""Gist compression of instructions the compressor has never seen (issue 14, item 3).

A gist compressor (training/methods/gist_compressor.py: k gist embeddings + a LoRA adapter active only while
compressing) is trained on many tasks with paraphrased instructions; the frozen LM then answers from the
gist keys/values alone. Scored on held-out tasks (all their paraphrases) and on held-out paraphrases of the
trained tasks, against: no instruction (negative control), the full instruction read by the same frozen LM
(positive control), and the gist of another task's instruction (swapped). ROUGE-L of greedy answers and
mean target log-likelihood, per k (compression ratio = instruction tokens / k). Goal: on held-out tasks the
gist closes >= half the negative-to-positive gap, and the swapped gist closes at most half of what the
right one does.

Writes bench/results/gist_compression.{md,json,png}. `--quick` is a plumbing check (tiny steps and items).
Every compressor is stored and read back as an artifact (safetensors bytes) before it is evaluated.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common.real_data import SPECS  # noqa: E402
from prompt_store import from_bytes, to_bytes, validate_artifact  # noqa: E402
from runtime.gist import compressor_view, instruction_ids  # noqa: E402
from runtime.model_runner import ModelRunner  # noqa: E402
from training.gist_eval import Condition, full_instruction, gap_closed, gist_condition, score  # noqa: E402
from training.gist_tasks import GistTask, build_tasks, eval_examples, split_tasks  # noqa: E402
from training.methods.gist_compressor import CompressorConfig, train_compressor  # noqa: E402
from training.model import load_model  # noqa: E402

REAL = ("movie_sentiment", "sms_spam", "trec_coarse", "capitals")
CAPITAL_TO_COUNTRY = (
    "Which country has this city as its capital? Answer with the country name.",
    "Name the country whose capital is given.",
    "Give the country this capital city belongs to, nothing else.",
)
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{(time.monotonic() - T0) / 60:5.1f} min] {msg}", flush=True)


def real_tasks() -> tuple[dict[str, tuple[Sequence[str], Sequence[tuple[str, str]]]], list[str]]:
    """The bench extra's corpora as gist tasks (+ capital -> country), and texts for the templated tasks."""
    real: dict[str, tuple[Sequence[str], Sequence[tuple[str, str]]]] = {}
    for name in REAL:
        real[name] = (SPECS[name].instructions, SPECS[name].load())
    caps = real["capitals"][1]
    real["capital_to_country"] = (CAPITAL_TO_COUNTRY, [(c, n) for n, c in caps])
    return real, [x for x, _ in real["movie_sentiment"][1][:2000]]


def evaluate(
    runner: ModelRunner, conds: dict[str, Any], task: GistTask, instruction: str, n: int, max_new: int
) -> dict[str, tuple[list[float], list[float]]]:
    """Scores of each condition for one (task, instruction)."""
    examples = eval_examples(task, n)
    return {name: score(runner, cond, examples, max_new) for name, cond in conds.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    lm = load_model(args.model, device=args.device)
    runner = lm.runner
    real, texts = real_tasks()
    tasks = build_tasks(texts, real, per_task=args.per_task)
    train, held = split_tasks(tasks)
    log(
        f"loaded {runner.name}; {len(tasks)} tasks ({len(train)} trained, held out: {[t.name for t in held]})"
    )
    compressors: dict[int, tuple[Any, Any]] = {}
    losses: dict[int, list[float]] = {}
    for k in args.ks:
        cfg = CompressorConfig(
            num_gist_tokens=k, steps=args.steps, n_eval=args.eval_n, distill=args.distill, lr=args.lr
        )
        comp, losses[k] = train_compressor(runner, train, cfg, log=lambda m, k=k: log(f"k={k} {m}"))
        stored = from_bytes(to_bytes(comp.to_artifact(runner, f"compressor-k{k}")))  # the stored artifact
        validate_artifact(stored, runner.fingerprint)
        view = compressor_view(runner, stored.manifest.method_config, stored.tensors)
        compressors[k] = (stored.tensors["gist_embeddings"], view)
        log(f"k={k}: trained {args.steps} steps, artifact {stored.nbytes()} bytes")
    rows: list[dict[str, Any]] = []
    plans = [("held-out task", t, list(t.instructions[: args.paraphrases]), args.eval_n) for t in held]
    plans += [("held-out paraphrase", t, [t.held_out_instruction], args.eval_n_seen) for t in train]
    plans = plans[: args.max_evals]
    for split, task, instructions, n in plans:
        others = held if split == "held-out task" else train
        other = others[(others.index(task) + 1) % len(others)]
        for i, instruction in enumerate(instructions):
            swapped = other.instructions[i % len(other.instructions)]
            conds: dict[str, Any] = {
                "no instruction": Condition(),
                "full instruction": full_instruction(runner, instruction),
            }
            for k, (gists, view) in compressors.items():
                conds[f"gist k={k}"] = gist_condition(runner, instruction, gists, view)
                conds[f"swapped gist k={k}"] = gist_condition(runner, swapped, gists, view)
            for name, (rouge, ll) in evaluate(runner, conds, task, instruction, n, args.max_new).items():
                rows.append(
                    {
                        "split": split,
                        "task": task.name,
                        "instruction": instruction,
                        "condition": name,
                        "rouge_l": rouge,
                        "loglik": ll,
                        "tokens": len(instruction_ids(runner, instruction)),
                    }
                )
        log(f"scored {split} {task.name}")
    return {
        "rows": rows,
        "losses": {str(k): v for k, v in losses.items()},
        "model": runner.name,
        "tasks": [t.name for t in tasks],
        "held_out": [t.name for t in held],
    }


def summarize(rows: list[dict[str, Any]], split: str) -> dict[str, dict[str, float]]:
    """condition -> mean ROUGE-L, log-likelihood and instruction tokens over every example of `split`."""
    out: dict[str, dict[str, float]] = {}
    for cond in dict.fromkeys(r["condition"] for r in rows):
        sel = [r for r in rows if r["split"] == split and r["condition"] == cond]
        if sel:
            out[cond] = {
                "rouge_l": statistics.mean(v for r in sel for v in r["rouge_l"]),
                "loglik": statistics.mean(v for r in sel for v in r["loglik"]),
                "tokens": statistics.mean(r["tokens"] for r in sel),
            }
    return out


def report(args: argparse.Namespace, result: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    lines = [
        f"# Gist compression of unseen instructions{' (quick: plumbing only)' if args.quick else ''}",
        "",
    ]
    lines += [
        f"- model {result['model']}; {len(result['tasks'])} tasks, held out: {', '.join(result['held_out'])}",
        f"- compressor: LoRA r=8 on q/k/v (active only while compressing) + k gist embeddings; "
        f"{args.steps} steps x 2 tasks x 4 examples, lr {args.lr}, distill weight {args.distill}; "
        f"{args.eval_n} examples per held-out (task, paraphrase), {args.eval_n_seen} per seen task",
        f"- run time {result.get('elapsed_s', time.monotonic() - T0) / 60:.1f} min (CPU, 2 shared cores); "
        "the budget (<= 25 min) trimmed the run: few steps, 2 paraphrases per held-out task, few examples, "
        "greedy answers of at most --max-new tokens",
        "",
    ]
    goals = []
    for split in ("held-out task", "held-out paraphrase"):
        s = summarize(result["rows"], split)
        if not s:  # --max-evals stopped before this split
            continue
        neg, pos = s["no instruction"], s["full instruction"]
        lines += [
            f"## {split}s",
            "",
            "scored: " + ", ".join(dict.fromkeys(r["task"] for r in result["rows"] if r["split"] == split)),
            "",
            "| condition | ratio (tokens / k) | ROUGE-L | gap closed | log-lik | gap closed |",
            "|---|---|---|---|---|---|",
        ]
        for cond, v in s.items():
            ratio = f"{v['tokens'] / int(cond.split('=')[1]):.1f}" if "k=" in cond else "-"
            gr = gap_closed(v["rouge_l"], neg["rouge_l"], pos["rouge_l"])
            gl = gap_closed(v["loglik"], neg["loglik"], pos["loglik"])
            lines.append(
                f"| {cond} | {ratio} | {v['rouge_l']:.3f} | {gr:.2f} | {v['loglik']:.3f} | {gl:.2f} |"
            )
            if split == "held-out task" and cond.startswith("gist"):
                k = cond.split("=")[1]
                sw = s[f"swapped gist k={k}"]
                sr = gap_closed(sw["rouge_l"], neg["rouge_l"], pos["rouge_l"])
                goals.append(
                    {
                        "measure": f"held-out tasks, gist k={k}: ROUGE-L gap closed",
                        "target": ">= 0.5",
                        "measured": f"{gr:.2f}",
                        "met": bool(gr >= 0.5),
                    }
                )
                goals.append(
                    {
                        "measure": f"held-out tasks, gist k={k}: log-lik gap closed",
                        "target": ">= 0.5",
                        "measured": f"{gl:.2f}",
                        "met": bool(gl >= 0.5),
                    }
                )
                goals.append(
                    {
                        "measure": f"held-out tasks, swapped gist k={k}: ROUGE-L gap closed",
                        "target": f"<= half the right gist's ({gr / 2:.2f})",
                        "measured": f"{sr:.2f}",
                        "met": bool(sr <= gr / 2),
                    }
                )
        lines.append("")
    met = all(g["met"] for g in goals) and not args.quick
    lines += ["## Verdict", ""]
    if met:
        lines.append(
            "The goal is met: on held-out tasks the gist closes at least half of the gap, and the "
            "swapped gist does clearly worse. This is compression of unseen instructions."
        )
    else:
        missed = [str(g["measure"]) for g in goals if not g["met"]]
        lines.append(
            "The goal is NOT met"
            + (" (quick run)" if args.quick else "")
            + "; missed: "
            + ("; ".join(missed) or "none (quick run)")
            + ". This run does not show compression of "
            "unseen instructions; see the rows above for what the gist does reach."
        )
        lines += ["", *why(summarize(result["rows"], "held-out task"), args.steps)]
    return "\n".join(lines) + "\n", goals


def why(s: dict[str, dict[str, float]], steps: int) -> list[str]:
    """The reading of a missed goal: does the gist's gain depend on the instruction at all?"""
    out = []
    for cond in [c for c in s if c.startswith("gist k=")]:
        right, swapped = s[cond], s[f"swapped {cond}"]
        if (
            abs(right["rouge_l"] - swapped["rouge_l"]) < 0.05
            and abs(right["loglik"] - swapped["loglik"]) < 0.1
        ):
            out.append(
                f"- {cond}: the swapped gist scores as well as the right one (ROUGE-L "
                f"{swapped['rouge_l']:.3f} vs {right['rouge_l']:.3f}, log-lik {swapped['loglik']:.3f} vs "
                f"{right['loglik']:.3f}), so what it gains over no instruction does not come from the "
                "instruction: the compressor learned an instruction-independent prior (answer briefly after "
                "`Output:`), a task switch, not compression."
            )
    out.append(
        f"- Why: the compressor saw only {steps} x 8 examples on this CPU budget (the paper fine-tunes the "
        "whole LM for thousands of steps), and SmolLM2-135M's own positive control is weak on raw-text "
        "prompts, so the gap to close is small and noisy at this sample size."
    )
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("rouge_l", "loglik"), strict=True):
        s = summarize(result["rows"], "held-out task")
        ax.bar(list(s), [v[metric] for v in s.values()], color="tab:blue")
        ax.set_title(f"held-out tasks: {metric}")
        ax.tick_params(axis="x", rotation=40)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (%(default)s)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ks", default="1,4", help="gist tokens per compressor, comma-separated (%(default)s)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--distill", type=float, default=0.5, help="weight of the full-instruction KL term")
    p.add_argument("--per-task", type=int, default=200, help="examples built per task")
    p.add_argument("--eval-n", type=int, default=12, help="examples per held-out (task, paraphrase)")
    p.add_argument("--eval-n-seen", type=int, default=4, help="examples per seen task (held-out paraphrase)")
    p.add_argument("--max-new", type=int, default=8)
    p.add_argument("--paraphrases", type=int, default=3, help="paraphrases scored per held-out task")
    p.add_argument("--max-evals", type=int, default=1000, help="(split, task) pairs scored, at most")
    p.add_argument("--quick", action="store_true", help="2 steps, 2 examples: plumbing only")
    p.add_argument("--from-json", default=None, help="re-render the report of a finished run's JSON")
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    args.ks = [int(k) for k in args.ks.split(",") if k.strip()]
    if args.quick:
        args.steps, args.per_task, args.eval_n, args.eval_n_seen, args.max_new = 2, 30, 2, 1, 3
        args.paraphrases, args.max_evals, args.threads = 1, 6, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.from_json:  # re-render a finished run's table, verdict and chart (no model is loaded)
        result = json.loads(Path(args.from_json).read_text())["data"]
    else:
        result = run(args)
        result["elapsed_s"] = round(time.monotonic() - T0, 1)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = "gist_compression-quick" if args.quick else "gist_compression"
    if not args.from_json:  # the run's data first (goals below): a failed report can be redrawn --from-json
        (out / f"{name}.json").write_text(json.dumps({"name": name, "data": result}, indent=1) + "\n")
    markdown, goals = report(args, result)
    (out / f"{name}.md").write_text(markdown)
    payload = {
        "name": name,
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        "elapsed_s": result.get("elapsed_s", round(time.monotonic() - T0, 1)),
        "goals": goals,
        "data": result,
    }
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    plot(result, out / f"{name}.png")
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
