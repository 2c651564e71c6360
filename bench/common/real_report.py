"""bench/methods_real.py's outputs: the markdown table, the JSON payload and the chart (rewritten after every
result, so an interrupted run still leaves a table)."""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any

import torch


def _fmt(st: tuple[float, float] | None, n: int) -> str:
    if st is None:
        return "—"
    mean, std = st
    return f"{100 * mean:.1f} ± {100 * std:.1f}" + (f" (n={n})" if n != 3 else "")


def payload(bench: Any) -> dict[str, Any]:
    args = bench.args
    cells = [
        {
            "task": task,
            "method": method,
            "exact_match": c.em,
            "label_accuracy": c.label_acc,
            "params": c.params,
            "artifact_bytes": c.artifact_bytes,
            "train_s": c.train_s,
            "samples": c.samples,
        }
        for (task, method), c in bench.cells.items()
    ]
    return {
        "model": bench.lm.name,
        "device": args.device,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seeds": args.seeds,
        "quick": args.quick,
        "tasks": {
            t.name: {"train": len(t.train), "test": len(t.test), "labels": list(t.labels)}
            for t in bench.tasks.values()
        },
        "elapsed_min": (time.monotonic() - bench.t0) / 60,
        "skipped": bench.skipped,
        "cells": cells,
    }


def markdown(bench: Any, data: dict[str, Any]) -> str:
    from bench.methods_real import ROWS

    args = bench.args
    lines = [
        f"# methods on real data: {bench.lm.name} ({args.device})",
        "",
        f"- model {bench.lm.name} (float32, {args.device}); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {platform.machine()}, {os.cpu_count()} cores",
        "- tasks (train used / test scored): "
        + ", ".join(f"{n} ({v['train']}/{v['test']})" for n, v in data["tasks"].items())
        + "; fixed splits from bench/common/real_data.py",
        f"- training: {args.steps} steps, batch {args.batch_size} per run (soft prompts: recipe lrs of "
        f"bench/methods.py; LoRA r=8 on q/v, lr 5e-4); seeds {args.seeds}; wall time "
        f"{data['elapsed_min']:.1f} min"
        + (" — **QUICK RUN: plumbing only, not meaningful**" if args.quick else ""),
        "- cells: mean ± std in % over seeds; EM = exact match after normalisation (greedy, serving form); "
        "LL = label log-likelihood accuracy; zero-shot is deterministic (one run)",
        "",
    ]
    for task in data["tasks"]:
        lines += [
            f"## {task}",
            "",
            "| method | EM | LL acc | trainable params | artifact bytes | train s/run |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for method in ROWS:
            c = bench.cells.get((task, method))
            if c is None:
                continue
            secs = sum(c.train_s) / max(1, len(c.train_s))
            em, ll = _fmt(c.stats(c.em), len(c.em)), _fmt(c.stats(c.label_acc), len(c.label_acc))
            lines.append(f"| {method} | {em} | {ll} | {c.params:,} | {c.artifact_bytes:,} | {secs:.0f} |")
        lines.append("")
    if bench.skipped:
        lines += [f"**skipped (budget {args.budget_min:.0f} min):** {', '.join(bench.skipped)}", ""]
    return "\n".join(lines)


def chart(bench: Any, path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.methods_real import ROWS

    tasks = list(bench.tasks)
    methods = [m for m in ROWS if any((t, m) in bench.cells for t in tasks)]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        means, stds = [], []
        for t in tasks:
            c = bench.cells.get((t, m))
            st = c.stats(c.em) if c else None
            means.append(100 * st[0] if st else 0.0)
            stds.append(100 * st[1] if st else 0.0)
        xs = [j + (i - len(methods) / 2) * width for j in range(len(tasks))]
        ax.bar(xs, means, width, yerr=stds, label=m, capsize=2)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("exact match %")
    ax.set_title(f"methods on real data ({bench.lm.name}, {bench.args.steps} steps)")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(bench: Any, final: bool = False) -> None:
    out = bench.args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    data = payload(bench)
    out.write_text(markdown(bench, data))
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    if final:
        chart(bench, out.with_suffix(".png"))
