"""Gist benchmark: prefill FLOPs and time to first token with the full instruction vs its gist artifact.

Prints and writes bench/results/gist.md (+ .json) and a chart bench/results/gist.png. Three real task
instructions (short, medium, long few-shot) are compressed with runtime/gist.py's `compress` into `gist`
artifacts of k = 1, 2, 4 gist tokens. The gist embeddings are UNTRAINED (random init like the trainer's:
mean vocabulary embedding + noise): cost does not depend on what the gists learned; their quality is measured
in bench/methods.py. One request at a time through the in-process Engine (max_new_tokens=1, greedy), the same
chat-formatted input on every row:
- bare: the engine with no task, the input alone (no instruction at all).
- full: the bare engine with [instruction ; input] as the prompt: the instruction prefilled every request.
- gist k: the engine serving the gist task: the input prefilled after k cached gist KV positions.
Measured per row: prefill FLOPs of the engine's actual forward (torch FlopCounterMode; attention counted as
2 matmuls over all query x key pairs, i.e. without the causal half) next to the analytic
2 x non-embedding params x tokens (+ the LM head on the last position); TTFT = enqueue -> first token event
(median / p90, every row interleaved in rotating order per repetition); compression ratio = instruction
tokens / k; KV bytes per task: the instruction's KV cache vs the gist KV (runner dtype).
Goals: gist TTFT <= 1.15 x bare TTFT (worst k per instruction); full / gist FLOPs >= 0.9 x the ideal
(instruction + input) / input.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.flops import analytic_flops, count_flops, kv_bytes  # noqa: E402
from common.stats import quantile  # noqa: E402
from harness import (  # noqa: E402
    RESULTS,
    Goal,
    add_device_args,
    bench_runner,
    chat_ids,
    hardware_line,
    savefig,
    write_report,
)

from prompt_store import (  # noqa: E402
    Artifact,
    TaskPrompt,  # noqa: E402
    make_artifact,
    parse_and_validate,
    to_bytes,
    to_serving_form,
)
from runtime.gist import compress, instruction_ids  # noqa: E402
from runtime.model_runner import ModelRunner  # noqa: E402
from server.engine import Engine  # noqa: E402
from server.requests import GenerationRequest, SamplingParams, TokenEvent  # noqa: E402

KS = (1, 2, 4)
INPUT = "The battery died after two days and nobody from support ever answered my emails."
INSTRUCTIONS = {
    "short": (
        "You are a sentiment classifier. Read the customer review and answer with exactly one word: "
        "positive or negative."
    ),
    "medium": (
        "You are the triage assistant of an online electronics shop. Read the customer's message and "
        "classify it into exactly one of these categories: billing (payments, refunds, invoices, charges), "
        "shipping (delivery times, lost parcels, tracking numbers, addresses), product (defects, batteries, "
        "screens, setup problems, missing accessories), account (passwords, login, email changes, deleting "
        "the account) or other. Then rate the urgency as low, medium or high: high when the customer cannot "
        "use a product they paid for or threatens to cancel. Answer in the form 'category, urgency' and "
        "nothing else."
    ),
    "long": (
        "You are a sentiment classifier for product reviews. Read the review and answer with exactly one "
        "word: positive or negative. A review is positive when the customer is satisfied overall, even if "
        "they mention small problems; it is negative when the product failed, arrived broken, did not match "
        "its description, or the customer regrets the purchase. Ignore shipping speed unless it is the main "
        "complaint. Sarcasm counts as negative. Here are examples.\n"
        "Review: The headphones sound amazing and the battery lasts all week. Answer: positive\n"
        "Review: It stopped charging after one week and the seller ignored my refund request. "
        "Answer: negative\n"
        "Review: Took a while to arrive, but the blender is powerful and easy to clean. Answer: positive\n"
        "Review: Great, another charger that melts. Exactly what I wanted. Answer: negative\n"
        "Review: The jacket fits perfectly and kept me warm on a freezing hike. Answer: positive\n"
        "Review: The screen has dead pixels and the box was clearly opened before. Answer: negative\n"
        "Review: Setup was confusing, but once running the printer has been flawless. Answer: positive\n"
        "Review: The colour is nothing like the photos and the fabric feels cheap. Answer: negative\n"
        "Review: My kids love this board game; we play it every weekend. Answer: positive\n"
        "Review: The lid cracked the first time I put it in the dishwasher. Answer: negative\n"
        "Review: Comfortable shoes, true to size, and they still look new after months. Answer: positive\n"
        "Review: Customer service sent the wrong part twice and then closed my ticket. Answer: negative\n"
        "Answer with one lowercase word and no punctuation."
    ),
}


def gist_embeddings(runner: ModelRunner, k: int, seed: int) -> Artifact:
    """An untrained gist_embedding artifact: the trainer's init (mean vocab embedding + 0.1 std noise)."""
    emb = runner.model.get_input_embeddings().weight.detach().float().cpu()  # [V, d]
    noise = torch.randn(k, emb.shape[1], generator=torch.Generator().manual_seed(seed))  # [k, d]
    gists = emb.mean(0)[None] + noise * float(emb.std()) * 0.1  # [k, d]
    return make_artifact(
        f"bench-gists-{k}",
        "gist_embedding",
        {"num_gist_tokens": k},
        {"gist_embeddings": gists},
        runner.fingerprint,
    )


def sync(runner: ModelRunner) -> None:
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)


def engine_ttft(engine: Engine, ids: list[int], task: TaskPrompt | None) -> tuple[float, int]:
    """Seconds from enqueue to the first token event, and that token."""
    got: list[tuple[float, int]] = []

    def deliver(event: TokenEvent) -> None:
        if event.token_id is not None and not got:
            got.append((time.perf_counter(), event.token_id))

    sync(engine.runner)
    t0 = time.perf_counter()
    engine.enqueue(GenerationRequest(list(ids), SamplingParams(max_new_tokens=1), task), deliver)
    while engine.active or engine.queue_depth:
        engine.step()
    assert got, "no token"
    return got[0][0] - t0, got[0][1]


def main() -> None:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_args(parser)
    parser.add_argument("--reps", type=int, default=25, help="timed repetitions per row (default: 25)")
    args = parser.parse_args()
    runner = bench_runner(args.device, args.dtype, args.threads)
    ids = chat_ids(runner, INPUT)
    engine = Engine(runner, max_batch_size=4)

    embeddings = {k: gist_embeddings(runner, k, seed=k) for k in KS}
    instr_ids = {name: instruction_ids(runner, text) for name, text in INSTRUCTIONS.items()}
    tasks: dict[tuple[str, int], TaskPrompt] = {}
    compress_s: dict[str, float] = {}
    compress_flops: dict[str, int] = {}
    artifact_bytes: dict[str, int] = {}
    for name, text in INSTRUCTIONS.items():
        for k in KS:
            task_id = f"gist-{name}-{k}"
            sync(runner)
            t0 = time.perf_counter()
            art = compress(runner, embeddings[k], text, task_id, keep=False)
            sync(runner)
            compress_s[f"{name} k={k}"] = time.perf_counter() - t0
            compress_flops[f"{name} k={k}"] = count_flops(
                lambda t=text, k=k, i=task_id: compress(runner, embeddings[k], t, i, keep=False)
            )[0]
            blob = to_bytes(art)
            artifact_bytes[f"{name} k={k}"] = len(blob)
            art = parse_and_validate(blob, runner.fingerprint)  # what an upload would go through
            assert art.manifest.method_config["next_position"] == len(instr_ids[name]) + k
            tasks[(name, k)] = TaskPrompt(task_id, 1, art.sha256, "gist", to_serving_form(art))

    runs: dict[str, Callable[[], tuple[float, int]]] = {"bare": lambda: engine_ttft(engine, ids, None)}
    prompt_tokens = {"bare": len(ids)}
    for name in INSTRUCTIONS:
        full = instr_ids[name] + ids  # [instruction ; input]
        runs[f"{name} full"] = lambda full=full: engine_ttft(engine, full, None)
        prompt_tokens[f"{name} full"] = len(full)
        for k in KS:
            runs[f"{name} gist k={k}"] = lambda t=tasks[(name, k)]: engine_ttft(engine, ids, t)
            prompt_tokens[f"{name} gist k={k}"] = len(ids)

    for _ in range(3):  # warm-up of every path; the gist KV prefixes land in the engine's prefix cache
        for fn in runs.values():
            fn()
    flops = {}
    per_op = {}
    for row, fn in runs.items():
        flops[row], per_op[row] = count_flops(fn)

    samples: dict[str, list[float]] = {row: [] for row in runs}
    tokens: dict[str, set[int]] = {row: set() for row in runs}
    order = list(runs.items())
    for rep in range(args.reps):
        shift = rep % len(order)  # rotate the order so drift and noise hit every row alike
        for row, fn in order[shift:] + order[:shift]:
            seconds, token = fn()
            samples[row].append(seconds)
            tokens[row].add(token)
        if (rep + 1) % 5 == 0:
            print(f"repetition {rep + 1}/{args.reps}, {time.perf_counter() - started:.0f} s", flush=True)

    analytic = {row: analytic_flops(runner, n) for row, n in prompt_tokens.items()}
    goal_list = goals(runner, ids, instr_ids, samples, flops)
    elapsed = time.perf_counter() - started
    report = render(
        args,
        runner,
        ids,
        instr_ids,
        samples,
        tokens,
        flops,
        analytic,
        compress_s,
        compress_flops,
        artifact_bytes,
        goal_list,
        elapsed,
    )
    data = {
        "input_tokens": len(ids),
        "instruction_tokens": {n: len(v) for n, v in instr_ids.items()},
        "gist_tokens": list(KS),
        "prompt_tokens": prompt_tokens,
        "flops": flops,
        "flops_per_op": per_op,
        "analytic_flops": analytic,
        "seconds": samples,
        "first_tokens": {row: sorted(t) for row, t in tokens.items()},
        "compress_s": compress_s,
        "compress_flops": compress_flops,
        "artifact_bytes": artifact_bytes,
        "kv_bytes": {
            **{f"{n} full": kv_bytes(runner, len(v)) for n, v in instr_ids.items()},
            **{f"gist k={k}": kv_bytes(runner, k) for k in KS},
        },
        "elapsed_s": elapsed,
    }
    write_report("gist", report, goal_list, data)
    plot(runner, samples, flops, instr_ids, RESULTS / "gist.png")
    print(f"elapsed {time.perf_counter() - started:.1f} s")


def goals(
    runner: ModelRunner,
    ids: list[int],
    instr_ids: dict[str, list[int]],
    samples: dict[str, list[float]],
    flops: dict[str, int],
) -> list[Goal]:
    bare = statistics.median(samples["bare"])
    out = []
    for name, instr in instr_ids.items():
        worst = max(statistics.median(samples[f"{name} gist k={k}"]) / bare for k in KS)
        out.append(
            Goal(
                f"gist TTFT / bare TTFT, {name} instruction ({len(instr)} tokens), worst of k = "
                + ", ".join(map(str, KS)),
                "<= 1.15",
                f"{worst:.3f}",
                worst <= 1.15,
            )
        )
    for name, instr in instr_ids.items():
        ideal = (len(instr) + len(ids)) / len(ids)
        worst = min(flops[f"{name} full"] / flops[f"{name} gist k={k}"] for k in KS)
        out.append(
            Goal(
                f"prefill FLOPs full / gist, {name} instruction, worst k "
                f"(ideal (instr + input) / input = {ideal:.2f})",
                f">= {0.9 * ideal:.2f} (0.9 x ideal)",
                f"{worst:.2f}",
                worst >= 0.9 * ideal,
            )
        )
    return out


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def render(
    args: argparse.Namespace,
    runner: ModelRunner,
    ids: list[int],
    instr_ids: dict[str, list[int]],
    samples: dict[str, list[float]],
    tokens: dict[str, set[int]],
    flops: dict[str, int],
    analytic: dict[str, int],
    compress_s: dict[str, float],
    compress_flops: dict[str, int],
    artifact_bytes: dict[str, int],
    goal_list: list[Goal],
    elapsed: float,
) -> str:
    bare = statistics.median(samples["bare"])
    lines = [
        "# gist tokens: full instruction vs its gist artifact (prefill FLOPs, TTFT, compression)",
        "",
        hardware_line(runner),
        f"- one request at a time through the engine, input {len(ids)} tokens (chat-formatted review), first "
        "token only (greedy); instructions: "
        + ", ".join(f"{n} {len(v)} tokens" for n, v in instr_ids.items())
        + "; gist artifacts of k = "
        + ", ".join(map(str, KS))
        + " made by runtime/gist.py `compress`",
        "- gist embeddings are **untrained** (random init as the trainer's): FLOPs, time and bytes do not "
        "depend on what the gists learned; first tokens of gist rows are therefore not meaningful (quality: "
        "bench/methods.py)",
        "- full = bare engine with [instruction ; input] as the prompt; gist = engine serving the gist task "
        "(input prefilled after k cached gist positions); bare = input alone, no instruction",
        f"- TTFT: enqueue -> first token event, {args.reps} repetitions per row, all rows interleaved in "
        "rotating order; FLOPs: FlopCounterMode over one engine request (prefill forward; attention as full "
        "Q x K, causal half not subtracted); analytic = 2 x non-embedding params x prompt tokens + LM head",
        "",
        "| instruction | row | prompt tokens | FLOPs (counted) | FLOPs (analytic) | full / row FLOPs "
        "| TTFT median ms | p90 ms | median / bare | full / row TTFT |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ptoks = {"bare": len(ids)}
    for name, instr in instr_ids.items():
        ptoks[f"{name} full"] = len(instr) + len(ids)
        for k in KS:
            ptoks[f"{name} gist k={k}"] = len(ids)
    for row, xs in samples.items():
        med = statistics.median(xs)
        name = row.split()[0] if row != "bare" else "-"
        label = row if row == "bare" else row[len(name) + 1 :]
        if row == "bare":
            vs_full = "-"
            t_full = "-"
        else:
            full = f"{name} full"
            vs_full = f"{flops[full] / flops[row]:.2f}x"
            t_full = f"{statistics.median(samples[full]) / med:.2f}x"
        lines.append(
            f"| {name} | {label} | {ptoks[row]} | {flops[row] / 1e9:.2f} G | {analytic[row] / 1e9:.2f} G "
            f"| {vs_full} | {1e3 * med:.1f} | {1e3 * quantile(xs, 0.9):.1f} | {med / bare:.3f} | {t_full} |"
        )
    lines += [
        "",
        "Per task (instruction) — compression ratio, KV bytes held per task "
        f"({str(runner.dtype).replace('torch.', '')}), one-off compression cost:",
        "",
        "| instruction | tokens | k | compression ratio (= KV ratio) | instruction KV | gist KV "
        "| artifact bytes (fp32 + manifest) | compress ms | compress FLOPs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, instr in instr_ids.items():
        n = len(instr)
        for k in KS:
            key = f"{name} k={k}"
            lines.append(
                f"| {name} | {n} | {k} | {n / k:.1f}x | {_mb(kv_bytes(runner, n))} "
                f"| {_mb(kv_bytes(runner, k))} | {_mb(artifact_bytes[key])} | {1e3 * compress_s[key]:.1f} "
                f"| {compress_flops[key] / 1e9:.2f} G |"
            )
    lines += ["", "Goals:", ""]
    for g in goal_list:
        lines.append(
            f"- {g.measure}: goal {g.target}, measured **{g.measured}** ({'met' if g.met else 'NOT met'})"
        )
    steady = all(len(t) == 1 for t in tokens.values())
    lines += [
        "",
        f"Same first token in every repetition of every row: {steady} (tokens in the json); "
        f"run time {elapsed:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def plot(
    runner: ModelRunner,
    samples: dict[str, list[float]],
    flops: dict[str, int],
    instr_ids: dict[str, list[int]],
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(instr_ids)
    series = ["full", *(f"gist k={k}" for k in KS)]
    width = 0.8 / (len(series) + 1)
    xs = range(len(names))
    fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(12, 4.5))
    bare_t = 1e3 * statistics.median(samples["bare"])
    bare_f = flops["bare"] / 1e9
    for j, s in enumerate(series):
        offs = [x + (j - len(series) / 2) * width for x in xs]
        ax_t.bar(offs, [1e3 * statistics.median(samples[f"{n} {s}"]) for n in names], width, label=s)
        ax_f.bar(offs, [flops[f"{n} {s}"] / 1e9 for n in names], width, label=s)
    for ax, bare, unit in ((ax_t, bare_t, "TTFT median (ms)"), (ax_f, bare_f, "prefill GFLOPs")):
        ax.axhline(bare, color="black", linestyle="--", linewidth=1, label="bare (input only)")
        ax.set_xticks(list(xs), [f"{n}\n({len(instr_ids[n])} instr tokens)" for n in names])
        ax.set_ylabel(unit)
        ax.legend(fontsize=8)
    ax_t.set_title(f"time to first token, {runner.name} on {runner.device}")
    ax_f.set_title("prefill FLOPs per request (FlopCounterMode)")
    savefig(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
