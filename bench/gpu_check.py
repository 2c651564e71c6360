"""GPU check: the exactness suite's core cases in bf16 on CUDA (exact on CPU float32), mixed-batch tokens/s.

For each model (a tiny Llama with SmolLM2's tokenizer, and the embedded SmolLM2-135M-Instruct) one mixed
batch runs every method with staggered arrivals (continuous batching): bare, prompt tuning, P-tuning, prefix
tuning, gist, and ACCEPT with its delta (prompt shorter and longer than the delta). Each request is then run
alone. The reference is a full recompute in float32 on the same device (no KV cache: every step forwards the
whole [prefix; prompt; generated] sequence), free-running greedy for token agreement and teacher-forced on the
engine's own tokens for the log-prob gap.
- exact mode (CPU, float32): mixed == alone == reference, token for token;
- tolerance mode (any other device/dtype): at every generated token, reference log-prob of its best token -
  reference log-prob of the engine's token <= --tol (mixed and alone), and the pooled token agreement before
  the first divergence, mixed vs reference, >= --min-agree. First divergences are reported per case.
Then --batch requests over the methods generate --tokens tokens each (greedy, eos ignored): engine tokens/s
against bare HF generate at the same batch size. Writes bench/results/gpu_check.md and .json (or --out).
Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import harness  # noqa: E402
from engine_refs import accept_prompt  # noqa: E402
from harness import QUESTIONS, Goal, chat_ids, hardware_line  # noqa: E402
from serve_smoke import build_tasks, build_workload, run_engine, run_hf_generate  # noqa: E402

from bench.common.tiny import tiny_llama  # noqa: E402
from prompt_store import SoftPrompt, TaskPrompt  # noqa: E402
from runtime.model_runner import ModelRunner, load_model, resolve_device, resolve_dtype  # noqa: E402
from server.engine import Engine  # noqa: E402
from server.requests import GenerationRequest, SamplingParams, TokenEvent  # noqa: E402


@dataclass
class Case:
    name: str
    method: str
    prompt: SoftPrompt | None
    ids: list[int]
    arrival: int  # engine step at which it joins the mixed batch

    def request(self, n: int) -> GenerationRequest:
        task = (
            TaskPrompt(f"check-{self.name}", 1, f"sha-{self.name}", self.method, self.prompt)
            if self.prompt
            else None
        )
        return GenerationRequest(list(self.ids), SamplingParams(max_new_tokens=n), task)


def runners(model: str, device: torch.device, dtype: torch.dtype) -> tuple[ModelRunner, ModelRunner]:
    """(engine runner in `dtype`, float32 reference runner), both on `device`, eos ignored."""
    if model == "smollm2":
        pair = [
            load_model(None, dtype=str(dt).removeprefix("torch."), device=str(device))
            for dt in (dtype, torch.float32)
        ]
        if dtype == torch.float32:
            pair[1] = pair[0]
        made = [ModelRunner.from_model(r.model, r.tokenizer, r.name, eos_ids=frozenset()) for r in pair]
        return made[0], made[1]
    from transformers import AutoTokenizer

    from prompt_store.embedded_model import ensure_smollm2

    tok = AutoTokenizer.from_pretrained(ensure_smollm2(), local_files_only=True)
    vocab = len(tok)
    return tuple(  # type: ignore[return-value]
        ModelRunner(tiny_llama(vocab), tok, "tiny-llama", device=device, dtype=dt, eos_ids=frozenset())
        for dt in (dtype, torch.float32)
    )


def text_embeds(ref: ModelRunner, text: str, seed: int) -> torch.Tensor:
    """A realistic embedding prefix [m, d] (float32, CPU): a text's embeddings, slightly perturbed."""
    emb = ref.embed(torch.tensor(ref.tokenizer(text)["input_ids"])).float().cpu()  # [m, d]
    return emb + torch.randn(emb.shape, generator=torch.Generator().manual_seed(seed)) * emb.std() * 0.1


def kv_prompt(ref: ModelRunner, embeds: torch.Tensor, keep: int | None = None) -> SoftPrompt:
    """Prefix tuning (all positions) or gist (the last `keep` positions) from an embedding sequence."""
    keys, values = ref.prefix_kv(SoftPrompt(embeds=embeds))  # [L, Hkv, m, Dh] each
    k = keys.shape[2] if keep is None else keep
    return SoftPrompt(
        keys=keys[:, :, -k:].float().cpu(),
        values=values[:, :, -k:].float().cpu(),
        next_position=keys.shape[2],
    )


def core_cases(ref: ModelRunner) -> list[Case]:
    d = ref.hidden_size
    pt = text_embeds(ref, "You answer like a pirate.", seed=1)
    pk = text_embeds(ref, "Answer in one short sentence.", seed=2)
    px = kv_prompt(ref, text_embeds(ref, "Always answer in French.", seed=3))
    instruction = text_embeds(ref, "Reply with one short sentence about animals.", seed=4)
    gist = kv_prompt(ref, torch.cat([instruction, pt[:3]]), keep=3)
    acc = accept_prompt(d, 4, 3, seed=5, scale=0.02)
    ids = [chat_ids(ref, q) for q in QUESTIONS]
    return [
        Case("bare", "bare", None, ids[0], 0),
        Case("prompt-tuning", "prompt_tuning", SoftPrompt(embeds=pt, next_position=pt.shape[0]), ids[1], 0),
        Case("p-tuning", "p_tuning", SoftPrompt(embeds=pk, next_position=pk.shape[0]), ids[2], 1),
        Case("prefix-tuning", "prefix_tuning", px, ids[3], 2),
        Case("gist", "gist", gist, ids[4], 2),
        Case("accept-long", "accept", acc, ids[6], 3),
        Case("accept-short", "accept", acc, [ids[5][0], ids[5][1]], 5),  # 2 ids: shorter than the delta
    ]


@torch.inference_mode()
def recompute_logprobs(ref: ModelRunner, case: Case, tokens: list[int]) -> torch.Tensor:
    """Full recompute (no cache reuse) over prompt + tokens: log-probs [len(tokens) + 1, V] of the next token
    after the prompt and after each of `tokens`."""
    dev, p = ref.device, case.prompt
    seq = torch.tensor(case.ids + tokens, device=dev)  # [n + t]
    n, model = len(case.ids), ref.model
    if p is not None and p.keys is not None and p.values is not None:
        layers = [(p.keys[i][None].to(dev), p.values[i][None].to(dev)) for i in range(p.keys.shape[0])]
        m = p.keys.shape[2]
        positions = torch.arange(p.next_position, p.next_position + len(seq), device=dev)[None]  # [1, n + t]
        mask = torch.ones(1, m + len(seq), dtype=torch.long, device=dev)  # [1, m + n + t]
        out = model(
            input_ids=seq[None], attention_mask=mask, position_ids=positions, cache=ref.new_cache(layers)
        )
        logits = out.logits[0]  # [n + t, V]
    else:
        x = ref.embed(seq).float()  # [n + t, d]
        if p is not None and p.added is not None:
            s = min(p.added.shape[0], n)
            x = torch.cat([x[:s] + p.added[:s].to(dev), x[s:]])  # [n + t, d]
        if p is not None and p.embeds is not None:
            x = torch.cat([p.embeds.to(dev), x])  # [m + n + t, d]
        mask = torch.ones(1, x.shape[0], dtype=torch.long, device=dev)  # [1, m + n + t]
        logits = model(inputs_embeds=x[None], attention_mask=mask).logits[0]  # [m + n + t, V]
    return torch.log_softmax(logits[-(len(tokens) + 1) :].float(), dim=-1)  # [t + 1, V]


def reference_tokens(ref: ModelRunner, case: Case, n: int) -> list[int]:
    """Free-running greedy over full recomputes."""
    tokens: list[int] = []
    for _ in range(n):
        tokens.append(int(recompute_logprobs(ref, case, tokens)[-1].argmax()))
    return tokens


def max_gap(ref: ModelRunner, case: Case, tokens: list[int]) -> float:
    """Teacher-forced on `tokens`: the largest reference log-prob gap, best token - the chosen one."""
    lp = recompute_logprobs(ref, case, tokens)[:-1]  # [t, V]
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0]  # [t]
    return float((lp.max(dim=1).values - chosen).max())


def first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def tokens_of(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def run_mixed(engine: Engine, cases: list[Case], n: int) -> dict[str, list[int]]:
    events: dict[str, list[TokenEvent]] = {c.name: [] for c in cases}
    step = 0
    while step <= max(c.arrival for c in cases) or engine.active or engine.queue_depth:
        for c in cases:
            if c.arrival == step:
                engine.enqueue(c.request(n), events[c.name].append)
        engine.step()
        step += 1
    return {name: tokens_of(ev) for name, ev in events.items()}


def check_model(name: str, args: argparse.Namespace, exact: bool) -> dict[str, Any]:
    runner, ref = runners(name, args.device, args.dtype)
    cases = core_cases(ref)
    engine = Engine(runner, max_batch_size=max(len(cases), args.batch))
    mixed = run_mixed(engine, cases, args.new_tokens)
    rows, agree, total = [], 0, 0
    for c in cases:
        alone = tokens_of(engine.generate_sync(c.request(args.new_tokens)))
        reference = reference_tokens(ref, c, args.new_tokens)
        row: dict[str, Any] = {"case": c.name, "method": c.method, "prompt_ids": len(c.ids)}
        row["mixed_vs_alone"] = first_divergence(mixed[c.name], alone)
        row["mixed_vs_ref"] = first_divergence(mixed[c.name], reference)
        row["alone_vs_ref"] = first_divergence(alone, reference)
        row["gap_mixed"], row["gap_alone"] = max_gap(ref, c, mixed[c.name]), max_gap(ref, c, alone)
        complete = len(mixed[c.name]) == len(alone) == args.new_tokens
        if exact:
            row["ok"] = complete and mixed[c.name] == alone == reference
        else:
            row["ok"] = complete and max(row["gap_mixed"], row["gap_alone"]) <= args.tol
        agree, total = agree + row["mixed_vs_ref"], total + args.new_tokens
        rows.append(row)
    result: dict[str, Any] = {"model": runner.name, "hardware": hardware_line(runner), "cases": rows}
    result["agreement"] = agree / total
    result["ok"] = all(r["ok"] for r in rows) and (exact or result["agreement"] >= args.min_agree)
    result["throughput"] = throughput(engine, args)
    return result


def throughput(engine: Engine, args: argparse.Namespace) -> dict[str, Any]:
    """--batch requests over every method vs the same prompts bare through HF generate; tokens/s."""
    runner = engine.runner
    tasks: list[TaskPrompt] = build_tasks(runner, 5)
    row_tasks, prompts = build_workload(runner, tasks, args.batch)
    bare = [[p[0]] * t.prompt.num_virtual_tokens + p for t, p in zip(row_tasks, prompts, strict=True)]
    params = SamplingParams(max_new_tokens=args.tokens)

    def mixed() -> list[GenerationRequest]:
        return [GenerationRequest(p, params, t) for t, p in zip(row_tasks, prompts, strict=True)]

    run_engine(engine, mixed())  # warm-up: prefixes converted, kernels chosen
    run_hf_generate(runner, bare, min(args.tokens, 4))
    out: dict[str, Any] = {"batch": args.batch, "tokens": args.tokens}
    for name, run in (
        ("mixed", lambda: run_engine(engine, mixed())),
        ("hf", lambda: run_hf_generate(runner, bare, args.tokens)),
    ):
        best = max((run() for _ in range(args.repeats)), key=lambda r: r.rate)
        out[name] = best.rate
    out["ratio"] = out["mixed"] / out["hf"]
    return out


def worst_gap(result: dict[str, Any]) -> float:
    return max(max(c["gap_mixed"], c["gap_alone"]) for c in result["cases"])


def render(results: list[dict[str, Any]], args: argparse.Namespace, exact: bool) -> str:
    mode = (
        "exact (mixed == alone == reference)"
        if exact
        else f"tolerance (log-prob gap <= {args.tol}, agreement >= {args.min_agree})"
    )
    lines = ["# GPU check: exactness of every method and mixed-batch tokens/s", ""]
    lines += [f"- {args.new_tokens} new tokens per case, greedy, eos ignored; mode: {mode}"]
    lines += ["- divergence columns: index of the first differing token (= N when none); gap: teacher-forced"]
    lines += [
        "  float32 full-recompute log-prob of the best token - that of the engine's token (max over tokens)"
    ]
    for r in results:
        lines += ["", f"## {r['model']}", "", r["hardware"], ""]
        lines += [
            "| case | method | mixed vs alone | mixed vs ref | alone vs ref | gap mixed | gap alone | ok |"
        ]
        lines += ["|---|---|---:|---:|---:|---:|---:|---|"]
        for c in r["cases"]:
            lines.append(
                f"| {c['case']} | {c['method']} | {c['mixed_vs_alone']} | {c['mixed_vs_ref']} | "
                f"{c['alone_vs_ref']} | "
                f"{c['gap_mixed']:.3g} | {c['gap_alone']:.3g} | {'yes' if c['ok'] else '**NO**'} |"
            )
        t = r["throughput"]
        lines += [
            "",
            f"Token agreement mixed vs reference (before the first divergence): {r['agreement']:.2f}. "
            f"{'PASS' if r['ok'] else '**FAIL**'}",
            "",
            f"Throughput, {t['batch']} requests x {t['tokens']} tokens (best of {args.repeats}, end to end): "
            f"mixed batch (engine) {t['mixed']:.1f} tok/s, bare HF generate {t['hf']:.1f} tok/s, "
            f"ratio {t['ratio']:.2f}",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument(
        "--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, ..."
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument(
        "--models", default="tiny,smollm2", help="comma list of tiny, smollm2 (default: both)"
    )
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens per exactness case (default: 16)")
    parser.add_argument("--batch", type=int, default=16, help="requests in the throughput run (default: 16)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per throughput request (default: 64)")
    parser.add_argument("--repeats", type=int, default=3, help="throughput runs, best kept (default: 3)")
    parser.add_argument(
        "--tol", type=float, default=0.5, help="max log-prob gap in tolerance mode (default: 0.5)"
    )
    parser.add_argument("--min-agree", type=float, default=0.5, help="min pooled agreement (default: 0.5)")
    parser.add_argument(
        "--out", type=Path, default=harness.RESULTS, help="results folder (default: bench/results)"
    )
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or set(models) - {"tiny", "smollm2"}:
        parser.error(f"--models takes tiny and/or smollm2, got {args.models!r}")
    if min(args.new_tokens, args.batch, args.tokens, args.repeats) < 1:
        parser.error("--new-tokens, --batch, --tokens and --repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = resolve_device(args.device)
    args.dtype = resolve_dtype(
        args.dtype if args.dtype != "auto" else ("bfloat16" if args.device.type == "cuda" else "float32")
    )
    exact = args.device.type == "cpu" and args.dtype == torch.float32
    results = []
    for name in models:
        results.append(check_model(name, args, exact))
        print(f"{name}: {'PASS' if results[-1]['ok'] else 'FAIL'}", flush=True)
    goals = [
        Goal(
            f"gpu check: every method, mixed / alone / reference ({r['model']}, {args.device.type}, "
            f"{str(args.dtype).removeprefix('torch.')})",
            "exact" if exact else f"gap <= {args.tol}, agreement >= {args.min_agree}",
            f"agreement {r['agreement']:.2f}, max gap {worst_gap(r):.3g}",
            bool(r["ok"]),
        )
        for r in results
    ]
    harness.RESULTS = args.out
    data = {"device": str(args.device), "dtype": str(args.dtype), "exact": exact, "results": results}
    harness.write_report("gpu_check", render(results, args, exact), goals, data)
    if not all(r["ok"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
