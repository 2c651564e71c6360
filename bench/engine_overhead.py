"""Engine overhead benchmark: engine step vs a bare HF decode loop, step growth with output length, KV copies.

A tiny Llama (hidden 64, 2 layers, GQA 4/2 heads, --vocab ids, random weights) on 1 CPU thread, timed in
process time (time.process_time_ns), so other processes on the machine add little. Every row has the same
--prompt-len prompt (no task, no padding) and generates exactly N tokens (greedy, no eos):
- engine: Engine(...).step() inline (no thread); all B rows join in the first step; each later step, with all
  B rows running and one token for each, is one decode step.
- bare: B rows through model(input_ids [B, 1], DynamicCache, attention mask), argmax, one token per step.
Measures, for B in --batches and N in --new-tokens:
- step ratio: median engine decode step / median bare decode step (per token position the fastest of
  --repeats runs, then the median over positions);
- growth: median step over the tokens 992-1,008 / over the tokens 8-24 (N >= 1,024), engine and bare;
- KV bytes moved (Engine.kv_copied()) by one admission and one retirement with 64 rows at T=1,024, next to
  one row's KV bytes at T=1,024.
Goals: step ratio <= 1.2 everywhere; engine growth <= 1.1 x bare growth; bytes per retirement <= 1 row's KV.
Host overhead on CPU by definition: --device and --dtype are accepted for uniformity and ignored; --threads
defaults to 1. Writes bench/results/engine_overhead.md, .json and .png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from engine_refs import IdTokenizer  # noqa: E402
from harness import RESULTS, Goal, add_device_args, hardware_line, savefig, write_report  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from bench.common.tiny import tiny_llama  # noqa: E402
from runtime.model_runner import ModelRunner  # noqa: E402
from server.engine import Engine  # noqa: E402
from server.requests import GenerationRequest, SamplingParams, TokenEvent  # noqa: E402

EARLY, LATE, HALF = 16, 1000, 8  # growth windows: tokens EARLY +- HALF and LATE +- HALF
KV_ROWS, KV_T = 64, 1024
STEP_GOAL, GROWTH_GOAL = 1.2, 1.1


def tiny_runner(vocab: int) -> ModelRunner:
    model = tiny_llama(vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return ModelRunner.from_model(model, IdTokenizer(), "tiny-llama", device="cpu", eos_ids=frozenset())


def prompts(b: int, n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (b, n), generator=g).tolist()


def engine_run(engine: Engine, rows: list[list[int]], n: int) -> tuple[dict[int, int], list[list[int]]]:
    """{token count after the step: process ns} for the decode steps with every row running, and tokens."""
    tokens: list[list[int]] = [[] for _ in rows]

    def deliver_to(i: int) -> Callable[[TokenEvent], None]:
        def deliver(event: TokenEvent) -> None:
            if event.token_id is not None:
                tokens[i].append(event.token_id)

        return deliver

    for i, ids in enumerate(rows):
        engine.enqueue(GenerationRequest(list(ids), SamplingParams(max_new_tokens=n)), deliver_to(i))
    times: dict[int, int] = {}
    while True:
        before = [len(t) for t in tokens]
        t0 = time.process_time_ns()
        engine.step()
        dt = time.process_time_ns() - t0
        after = [len(t) for t in tokens]
        if min(before) > 0 and all(a == b + 1 for a, b in zip(after, before, strict=True)):
            times[after[0]] = dt
        if not engine.active and not engine.queue_depth:
            return times, tokens


@torch.inference_mode()
def bare_run(model: Any, rows: list[list[int]], n: int) -> tuple[dict[int, int], list[list[int]]]:
    """The same rows through a plain greedy loop: prefill (untimed), then n - 1 timed one-token steps."""
    ids = torch.tensor(rows)  # [B, P]
    b, p = ids.shape
    cache = DynamicCache(config=model.config)
    mask = torch.ones(b, p, dtype=torch.long)  # [B, P]
    out = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
    x = out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
    generated = [x]
    times: dict[int, int] = {}
    for t in range(2, n + 1):
        t0 = time.process_time_ns()
        mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)  # [B, P + t - 1]
        out = model(input_ids=x, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
        x = out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        times[t] = time.process_time_ns() - t0
        generated.append(x)
    return times, torch.cat(generated, dim=1).tolist()  # [B, n]


def fastest(runs: list[dict[int, int]]) -> dict[int, float]:
    """Per token position, the fastest run's step time in ms (other processes only ever add time)."""
    keys = set.intersection(*(set(r) for r in runs))
    return {k: min(r[k] for r in runs) / 1e6 for k in sorted(keys)}


def window(times: dict[int, float], token: int) -> float:
    return statistics.median(v for k, v in times.items() if abs(k - token) <= HALF)


def measure(runner: ModelRunner, b: int, n: int, repeats: int, args: argparse.Namespace) -> dict[str, Any]:
    rows = prompts(b, args.prompt_len, args.vocab)
    engine = Engine(runner, max_batch_size=b)
    eng_runs, bare_runs, agree = [], [], True
    engine_run(engine, rows, 32)  # warm-up: allocator and first-call costs stay out of the timed runs
    bare_run(runner.model, rows, 32)
    for _ in range(repeats):  # interleaved, so machine noise hits both alike
        et, etok = engine_run(engine, rows, n)
        bt, btok = bare_run(runner.model, rows, n)
        eng_runs.append(et)
        bare_runs.append(bt)
        agree = agree and etok == btok
    eng, bare = fastest(eng_runs), fastest(bare_runs)
    res: dict[str, Any] = {"batch": b, "new_tokens": n, "repeats": repeats, "same_tokens": agree}
    res["engine_ms"], res["bare_ms"] = statistics.median(eng.values()), statistics.median(bare.values())
    res["step_ratio"] = res["engine_ms"] / res["bare_ms"]
    if n >= LATE + HALF:
        for name, times in (("engine", eng), ("bare", bare)):
            early, late = window(times, EARLY), window(times, LATE)
            res[f"{name}_early_ms"], res[f"{name}_late_ms"], res[f"{name}_growth"] = early, late, late / early
        res["growth_vs_bare"] = res["engine_growth"] / res["bare_growth"]
    res["engine_curve"] = {k: round(v, 4) for k, v in eng.items()}
    res["bare_curve"] = {k: round(v, 4) for k, v in bare.items()}
    growth = f"; growth / bare's {res['growth_vs_bare']:.2f}" if "growth_vs_bare" in res else ""
    print(f"B={b} N={n}: step ratio {res['step_ratio']:.2f}{growth}", flush=True)
    return res


def row_kv_bytes(runner: ModelRunner, t: int) -> int:
    """One row's keys and values at KV length t: 2 x layers x kv heads x t x head dim x element size."""
    item = torch.empty((), dtype=runner.dtype).element_size()
    return 2 * runner.num_layers * runner.num_kv_heads * t * runner.head_dim * item


def kv_copies(runner: ModelRunner, vocab: int) -> dict[str, Any]:
    """Engine.kv_copied() deltas over one admission and one retirement, KV_ROWS rows running at ~KV_T."""
    engine = Engine(runner, max_batch_size=KV_ROWS + 1)
    res: dict[str, Any] = {"rows": KV_ROWS, "kv_len": KV_T, "row_kv_bytes": row_kv_bytes(runner, KV_T)}
    if not hasattr(engine, "kv_copied"):
        res["error"] = "Engine.kv_copied() is missing: KV copy bytes not measured"
        return res
    params = SamplingParams(max_new_tokens=64)
    running = [GenerationRequest(ids, params) for ids in prompts(KV_ROWS, KV_T - 8, vocab, seed=1)]
    for req in running:
        engine.enqueue(req, lambda event: None)
    for _ in range(8):  # prefill (prompt + 1 token), then 7 decode steps: every row's KV is ~KV_T long
        engine.step()

    def delta(action: Callable[[], object]) -> dict[str, int]:
        before = dict(engine.kv_copied())
        action()
        engine.step()
        after = engine.kv_copied()
        return {k: int(after[k]) - int(before.get(k, 0)) for k in after}

    newcomer = GenerationRequest(prompts(1, 16, vocab, seed=2)[0], params)
    res["admission"] = delta(lambda: engine.enqueue(newcomer, lambda event: None))
    res["retirement"] = delta(lambda: engine.cancel(running[0].request_id))
    engine.cancel()
    engine.step()
    print(f"KV bytes: admission {res['admission']}, retirement {res['retirement']}", flush=True)
    return res


def goals_of(results: list[dict[str, Any]], kv: dict[str, Any]) -> list[Goal]:
    worst = max(results, key=lambda r: r["step_ratio"])
    bs = ",".join(str(b) for b in sorted({r["batch"] for r in results}))
    ns = ",".join(str(n) for n in sorted({r["new_tokens"] for r in results}))
    goals = [
        Goal(
            f"engine overhead: engine step / bare HF decode step, worst of B in {{{bs}}} x N in {{{ns}}}",
            f"<= {STEP_GOAL}",
            f"{worst['step_ratio']:.2f} (B={worst['batch']}, N={worst['new_tokens']})",
            worst["step_ratio"] <= STEP_GOAL,
        )
    ]
    grown = [r for r in results if "growth_vs_bare" in r]
    if grown:
        g = max(grown, key=lambda r: r["growth_vs_bare"])
        goals.append(
            Goal(
                f"engine overhead: step growth token {LATE} / {EARLY}, engine / bare loop's (worst B)",
                f"<= {GROWTH_GOAL}",
                f"{g['growth_vs_bare']:.2f} (B={g['batch']}: "
                f"{g['engine_growth']:.2f}x vs {g['bare_growth']:.2f}x)",
                g["growth_vs_bare"] <= GROWTH_GOAL,
            )
        )
    measure = f"engine overhead: KV bytes moved per retirement / 1 row's KV (B={KV_ROWS}, T={KV_T})"
    if "retirement" in kv:
        moved = sum(kv["retirement"].values())
        ratio = moved / kv["row_kv_bytes"]
        goals.append(Goal(measure, "<= 1", f"{ratio:.2f} ({moved:,} B)", ratio <= 1))
    else:
        goals.append(Goal(measure, "<= 1", "not measured (Engine.kv_copied() missing)", False))
    return goals


def render(
    runner: ModelRunner, args: argparse.Namespace, results: list[dict[str, Any]], kv: dict[str, Any]
) -> str:
    lines = [
        "# Engine overhead: engine step vs a bare HF decode loop",
        "",
        hardware_line(runner),
        f"- tiny Llama (hidden 64, 2 layers, vocab {args.vocab}), IdTokenizer; prompts of {args.prompt_len} "
        "tokens, no task, greedy, eos ignored; process time, 1 thread; per token position the fastest of "
        "the runs, then the median over the decode steps (all rows running)",
        "",
        "| B | N | runs | engine ms/step | bare ms/step | **step ratio** | same tokens |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['batch']} | {r['new_tokens']} | {r['repeats']} | {r['engine_ms']:.3f} | "
            f"{r['bare_ms']:.3f} | **{r['step_ratio']:.2f}** | {'yes' if r['same_tokens'] else 'NO'} |"
        )
    grown = [r for r in results if "growth_vs_bare" in r]
    if grown:
        lines += [
            "",
            f"Step growth: median step over tokens {LATE} +- {HALF} / over tokens {EARLY} +- {HALF} (ms).",
            "",
            f"| B | engine @{EARLY} | engine @{LATE} | engine growth | bare @{EARLY} | bare @{LATE} | "
            "bare growth | **engine / bare** |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in grown:
            lines.append(
                f"| {r['batch']} | {r['engine_early_ms']:.3f} | {r['engine_late_ms']:.3f} | "
                f"{r['engine_growth']:.2f}x | {r['bare_early_ms']:.3f} | {r['bare_late_ms']:.3f} | "
                f"{r['bare_growth']:.2f}x | **{r['growth_vs_bare']:.2f}** |"
            )
    lines += ["", f"KV bytes moved, {KV_ROWS} rows at T={KV_T} (one row's KV: {kv['row_kv_bytes']:,} B):", ""]
    if "error" in kv:
        lines.append(f"- {kv['error']}")
    else:
        for event in ("admission", "retirement"):
            moved = ", ".join(f"{k} {v:,} B" for k, v in kv[event].items())
            lines.append(
                f"- one {event}: {moved} (total {sum(kv[event].values()) / kv['row_kv_bytes']:.2f} rows)"
            )
    lines += [
        "",
        f"Goals: step ratio <= {STEP_GOAL} everywhere; growth <= {GROWTH_GOAL} x the bare loop's; "
        "KV bytes per retirement <= 1 row's KV.",
        "",
    ]
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    longest = max(r["new_tokens"] for r in results)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for r, color in zip(
        [r for r in results if r["new_tokens"] == longest],
        ("tab:blue", "tab:orange", "tab:green", "tab:red"),
        strict=False,
    ):
        for key, style, label in (("engine_curve", "-", "engine"), ("bare_curve", "--", "bare loop")):
            curve = r[key]
            ax.plot(
                list(curve), list(curve.values()), style, color=color, lw=1, label=f"{label}, B={r['batch']}"
            )
    ax.set_yscale("log")
    ax.set_xlabel("token (step index)")
    ax.set_ylabel("process ms per decode step (log)")
    ax.set_title(f"Engine step vs bare HF decode loop, N={longest}, tiny Llama, 1 thread", fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    savefig(fig, path)
    plt.close(fig)


def positive_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_device_args(parser)
    parser.add_argument(
        "--batches", type=positive_list, default=[1, 16, 64], help="rows B (default: 1,16,64)"
    )
    parser.add_argument(
        "--new-tokens", type=positive_list, default=[128, 1024], help="tokens per row N (default: 128,1024)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs per (B, N) at N > 128 (default: 2)")
    parser.add_argument("--vocab", type=int, default=1000, help="tiny model vocabulary (default: 1000)")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per row (default: 16)")
    args = parser.parse_args()
    if args.repeats < 1 or args.vocab < 8 or args.prompt_len < 1 or min(args.new_tokens) < 3:
        parser.error("--repeats and --prompt-len must be >= 1, --vocab >= 8, every --new-tokens >= 3")
    torch.set_num_threads(args.threads or 1)
    runner = tiny_runner(args.vocab)
    results = []
    for n in args.new_tokens:
        for b in args.batches:
            repeats = args.repeats if n > 128 else max(args.repeats, 3)
            results.append(measure(runner, b, n, repeats, args))
    kv = kv_copies(runner, args.vocab)
    goals = goals_of(results, kv)
    data = {"vocab": args.vocab, "prompt_len": args.prompt_len, "results": results, "kv": kv}
    write_report("engine_overhead", render(runner, args, results, kv), goals, data)
    plot(results, RESULTS / "engine_overhead.png")
    if "error" in kv:
        sys.exit(f"engine_overhead: {kv['error']}")


if __name__ == "__main__":
    main()
