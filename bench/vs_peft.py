"""softserve vs PEFT: 16 real PEFT prompt-learning adapters, one mixed batch vs one adapter at a time.

Prints and writes bench/results/vs_peft.md and a bar chart bench/results/vs_peft.png.
- 16 tasks cycling PROMPT_TUNING, P_TUNING (MLP encoder), PREFIX_TUNING with 8-32 virtual tokens, created with
  peft's get_peft_model on SmolLM2 (random init), saved with save_pretrained and imported with
  import_peft_adapter. Workload: --per-task requests per task (different questions), --new-tokens new tokens
  each (greedy, eos ignored).
- softserve: all requests enqueued at once into one Engine: one mixed continuous batch (prefixes warm).
- PEFT baseline (what a careful PEFT user can do, since PeftModel.generate is wrong for prompt learning with
  peft 0.21.2 + transformers 5.24): one adapter active at a time, requests grouped by task and batched per
  task (left padding). Per task batch, PEFT's own PeftModel.get_prompt(batch_size) gives the virtual tokens:
  prompt / P-tuning -> embeddings [B, m, d], run as HF generate(inputs_embeds=[prompt ; embed(input)]) on the
  base model (prefill over m + n, then KV-cached decoding); prefix tuning -> PEFT's prefix KV cache, run as
  HF generate(input_ids, cache=prefix KV). KV cache is used in both; adapter creation and import are untimed.
Greedy outputs are compared request by request. Goal: softserve tokens/s >= 3 x PEFT baseline.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import (  # noqa: E402
    QUESTIONS,
    RESULTS,
    Goal,
    add_device_args,
    bench_runner,
    chat_ids,
    hardware_line,
    savefig,
    write_report,
)
from peft import (  # noqa: E402
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)

from prompt_store import TaskPrompt, to_serving_form  # noqa: E402
from prompt_store.peft_import import import_peft_adapter  # noqa: E402
from runtime.model_runner import ModelRunner, load_model  # noqa: E402
from server.engine import Engine  # noqa: E402
from server.requests import GenerationRequest, SamplingParams, TokenEvent  # noqa: E402

PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")


@dataclass
class Task:
    peft_type: str
    m: int
    peft_model: Any
    task: TaskPrompt


def peft_config(peft_type: str, m: int) -> Any:
    if peft_type == "PROMPT_TUNING":
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=m)
    if peft_type == "P_TUNING":
        return PromptEncoderConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=m, encoder_hidden_size=128
        )
    return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=m)


def make_tasks(base: Any, runner: ModelRunner, n: int, folder: Path) -> list[Task]:
    tasks = []
    for i in range(n):
        peft_type, m = PEFT_TYPES[i % len(PEFT_TYPES)], 8 + (i * 7) % 25
        torch.manual_seed(100 + i)
        peft_model = get_peft_model(base, peft_config(peft_type, m)).eval()
        if peft_type == "PREFIX_TUNING":  # PEFT's N(0, 1) init is far outside real K/V scale; shrink it
            with torch.no_grad():
                peft_model.prompt_encoder["default"].embedding.weight.mul_(0.1)
        path = folder / f"task-{i:02d}"
        peft_model.save_pretrained(path)
        artifact = import_peft_adapter(path, f"peft-{i:02d}", runner.fingerprint)
        sha = artifact.sha256 or f"peft-{i:02d}"
        prompt = to_serving_form(artifact)
        tasks.append(
            Task(
                peft_type,
                m,
                peft_model,
                TaskPrompt(artifact.task_id, 1, sha, artifact.manifest.method, prompt),
            )
        )
    return tasks


def run_engine(
    engine: Engine, work: list[tuple[int, list[int]]], tasks: list[Task], n_new: int
) -> tuple[float, list[list[int]]]:
    outs: list[list[int]] = [[] for _ in work]

    def collect(i: int) -> Any:
        def deliver(event: TokenEvent) -> None:
            if event.token_id is not None:
                outs[i].append(event.token_id)

        return deliver

    t0 = time.perf_counter()
    for i, (t, ids) in enumerate(work):
        task = tasks[t].task if t >= 0 else None
        engine.enqueue(GenerationRequest(list(ids), SamplingParams(max_new_tokens=n_new), task), collect(i))
    while engine.active or engine.queue_depth:
        engine.step()
    return time.perf_counter() - t0, outs


@torch.inference_mode()
def run_peft(
    base: Any, work: list[tuple[int, list[int]]], tasks: list[Task], n_new: int, pad_id: int
) -> tuple[float, list[list[int]]]:
    """One adapter at a time; each task's requests as one left-padded batch through PEFT's virtual tokens."""
    outs: list[list[int]] = [[] for _ in work]
    gen = {
        "do_sample": False,
        "max_new_tokens": n_new,
        "min_new_tokens": n_new,
        "pad_token_id": pad_id,
        "eos_token_id": None,
    }
    t0 = time.perf_counter()
    for t, task in enumerate(tasks):
        rows = [i for i, (tt, _) in enumerate(work) if tt == t]
        if not rows:
            continue
        width = max(len(work[i][1]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, n]
        mask = torch.zeros(len(rows), width, dtype=torch.long)  # [B, n]
        for b, i in enumerate(rows):
            p = work[i][1]
            ids[b, width - len(p) :] = torch.tensor(p)
            mask[b, width - len(p) :] = 1
        prompt = task.peft_model.get_prompt(batch_size=len(rows))  # PEFT's own virtual tokens
        ones = torch.ones(len(rows), task.m, dtype=torch.long)  # [B, m]
        if task.peft_type == "PREFIX_TUNING":  # prompt: DynamicCache with the prefix K/V [B, Hkv, m, Dh]
            out = base.generate(input_ids=ids, attention_mask=torch.cat([ones, mask], 1), cache=prompt, **gen)
            new = out[:, width:]
        else:  # prompt: [B, m, d]; pads go first so positions start at 0 on the virtual tokens
            x = base.get_input_embeddings()(ids)  # [B, n, d]
            embeds = torch.cat([prompt.to(x.dtype), x], 1)  # [B, m + n, d]
            full = torch.cat([ones, mask], 1)  # [B, m + n]
            for b in range(len(rows)):  # left-pad: move the row's pads in front of its virtual tokens
                pads = int((mask[b] == 0).sum())
                if pads:
                    embeds[b] = torch.cat([x[b, :pads], prompt[b].to(x.dtype), x[b, pads:]])
                    full[b] = torch.cat([mask[b, :pads], ones[b], mask[b, pads:]])
            out = base.generate(inputs_embeds=embeds, attention_mask=full, **gen)
            new = out[:, -n_new:]
        for b, i in enumerate(rows):
            outs[i] = new[b].tolist()
    return time.perf_counter() - t0, outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_args(parser)
    parser.add_argument("--tasks", type=int, default=16, help="PEFT adapters (default: 16)")
    parser.add_argument("--per-task", type=int, default=2, help="requests per adapter (default: 2)")
    parser.add_argument("--new-tokens", type=int, default=24, help="new tokens per request (default: 24)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed runs (default: 3)")
    args = parser.parse_args()
    if min(args.tasks, args.per_task, args.new_tokens, args.repeats) < 1:
        parser.error("--tasks, --per-task, --new-tokens and --repeats must be >= 1")
    runner = bench_runner(args.device, args.dtype, args.threads)
    base = load_model(None, dtype=args.dtype, device=args.device).model.eval()  # PEFT's own base model copy
    base.requires_grad_(False)
    with tempfile.TemporaryDirectory() as tmp:
        tasks = make_tasks(base, runner, args.tasks, Path(tmp))
    work: list[tuple[int, list[int]]] = []
    for j in range(args.per_task):
        for t in range(len(tasks)):
            work.append((t, chat_ids(runner, QUESTIONS[(t + 3 * j) % len(QUESTIONS)])))
    n_new = args.new_tokens
    engine = Engine(runner, max_batch_size=len(work))
    run_engine(engine, work, tasks, 2)  # warm: every task's prefix converted once
    run_peft(base, work[: len(tasks)], tasks, 2, runner.pad_id)
    times: dict[str, list[float]] = {"softserve": [], "peft": []}
    outs: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):  # interleaved
        seconds, outs["softserve"] = run_engine(engine, work, tasks, n_new)
        times["softserve"].append(seconds)
        seconds, outs["peft"] = run_peft(base, work, tasks, n_new, runner.pad_id)
        times["peft"].append(seconds)
    same = sum(a == b for a, b in zip(outs["softserve"], outs["peft"], strict=True))
    bare_outs = run_engine(engine, [(-1, ids) for _, ids in work], [], n_new)[1]
    changed = sum(a != b for a, b in zip(outs["softserve"], bare_outs, strict=True))
    first_diff = [
        next((k for k, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        for a, b in zip(outs["softserve"], outs["peft"], strict=True)
    ]
    report = render(args, runner, tasks, work, times, same, first_diff, changed)
    tokens = len(work) * n_new
    ratio = statistics.median(times["peft"]) / statistics.median(times["softserve"])
    goals = [
        Goal(f"throughput softserve / PEFT, {len(tasks)} adapters", ">= 3x", f"{ratio:.2f}x", ratio >= 3),
        Goal(
            "greedy outputs identical to PEFT",
            f"{len(work)} / {len(work)}",
            f"{same} / {len(work)}",
            same == len(work),
        ),
    ]
    data = {"tokens": tokens, "seconds": times, "identical": same, "requests": len(work), "changed": changed}
    write_report("vs_peft", report, goals, data)
    plot(times, tokens, RESULTS / "vs_peft.png", runner)


def render(
    args: argparse.Namespace,
    runner: ModelRunner,
    tasks: list[Task],
    work: list[tuple[int, list[int]]],
    times: dict[str, list[float]],
    same: int,
    first_diff: list[int | None],
    changed: int,
) -> str:
    tokens = len(work) * args.new_tokens
    rate = {k: tokens / statistics.median(v) for k, v in times.items()}
    best = {k: tokens / min(v) for k, v in times.items()}
    ratio = rate["softserve"] / rate["peft"]
    kinds = ", ".join(f"{p} x{sum(t.peft_type == p for t in tasks)}" for p in PEFT_TYPES)
    ms = [t.m for t in tasks]
    lens = [len(ids) for _, ids in work]
    diffs = [d for d in first_diff if d is not None]
    verdict = "met" if ratio >= 3 else f"NOT met ({ratio:.2f}x)"
    lines = [
        "# softserve vs PEFT: 16 PEFT adapters, one mixed batch vs one adapter at a time",
        "",
        hardware_line(runner),
        f"- {len(tasks)} adapters made with peft get_peft_model (random init; {kinds}; "
        f"m = {min(ms)}-{max(ms)}), "
        "saved with save_pretrained, imported with import_peft_adapter",
        f"- {len(work)} requests ({args.per_task} per task, prompts {min(lens)}-{max(lens)} tokens), "
        f"{args.new_tokens} new tokens each (greedy, eos ignored); {args.repeats} interleaved runs, "
        "tokens/s = all new tokens / wall time (median run; best in brackets)",
        "- softserve: every request enqueued at once into one Engine "
        "(one mixed continuous batch; prefixes warm)",
        "- PEFT baseline: one adapter at a time, each task's requests as one left-padded batch; "
        "virtual tokens from PEFT's own PeftModel.get_prompt; prompt/P-tuning -> "
        "HF generate(inputs_embeds=[prompt ; input]) "
        "(prefill over m + n per batch), prefix tuning -> HF generate(input_ids, cache=PEFT prefix KV); "
        "KV-cached decoding in both. Not PeftModel.generate: with peft 0.21.2 + transformers 5.24 "
        "it is wrong "
        "after the first token for prompt/P-tuning and ignores prefix-tuning prefixes",
        "",
        "| run | tokens/s (median run) | seconds per run | ratio vs PEFT |",
        "|---|---:|---|---:|",
        f"| softserve, 1 mixed batch of {len(work)} | {rate['softserve']:.1f} ({best['softserve']:.1f}) | "
        f"{', '.join(f'{s:.2f}' for s in times['softserve'])} | {ratio:.2f} |",
        f"| PEFT, {len(tasks)} per-task batches of {args.per_task} | "
        f"{rate['peft']:.1f} ({best['peft']:.1f}) | "
        f"{', '.join(f'{s:.2f}' for s in times['peft'])} | 1.00 |",
        "",
        f"**throughput ratio softserve / PEFT = {ratio:.2f}x** (goal >= 3x: {verdict})",
        "",
        f"identical greedy outputs: **{same} / {len(work)}** requests"
        + (f" (the others first differ at new token {sorted(diffs)})" if diffs else "")
        + f"; the adapters change the output vs the bare model on {changed} / {len(work)} requests",
        "",
    ]
    return "\n".join(lines)


def plot(times: dict[str, list[float]], tokens: int, path: Path, runner: ModelRunner) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(times)
    rates = [tokens / statistics.median(times[n]) for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(
        ["softserve (1 mixed batch)", "PEFT (1 adapter at a time)"], rates, color=["tab:green", "tab:gray"]
    )
    ax.set_ylabel("tokens/s (median run)")
    ax.set_title(f"16 PEFT adapters, {runner.name} on {runner.device}")
    for i, r in enumerate(rates):
        ax.text(i, r, f"{r:.0f}", ha="center", va="bottom")
    savefig(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
