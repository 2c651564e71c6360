"""bench/hot_swap.py's records (samples, swaps, scenarios), their analysis, report, goals and CDF plot."""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import Goal, savefig

from common.stats import quantile

SWAPPED, STATIC = "hs-swapped", "hs-static"
CONVERGE_S = 10.0  # a probe giving up on a swap counts it as a violation
SAME_REPLICA_SLACK_S = 0.100  # a new version's first request: artifact read + validation + KV prefix
OTHER_REPLICA_SLACK_S = 1.0  # the default store poll interval (the bound without Redis pub/sub)


@dataclass
class Sample:
    who: str  # "load-3", "probe", "baseline"
    replica: str  # base URL
    task: str
    t_sent: float
    t_recv: float
    prompt: str = ""
    new_tokens: int = 0
    version: int | None = None
    tokens: tuple[int, ...] | None = None
    error: str | None = None


@dataclass
class Swap:
    version: int
    t_put: float
    t_ack: float
    latency_s: float | None  # t_ack -> probe response on the new version (None: not within CONVERGE_S)
    probes: int  # requests the probe needed (1 = the first request after the ack)
    baseline_s: float | None  # static-task request latency right after


@dataclass
class Scenario:
    name: str
    upload: str
    measure: str
    load_urls: list[str]
    swaps: list[Swap] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    put_errors: list[str] = field(default_factory=list)
    initial_version: int = 0
    static_version: int = 0
    window_s: float = 0.0


def analyse(sc: Scenario) -> dict[str, Any]:
    acked = {sc.initial_version: -1.0} | {s.version: s.t_ack for s in sc.swaps}
    put_start = {sc.initial_version: -1.0} | {s.version: s.t_put for s in sc.swaps}
    errors = [s for s in sc.samples if s.error is not None]
    ok = [s for s in sc.samples if s.error is None]
    violations: list[str] = []
    last: dict[tuple[str, str], int] = {}
    for s in sorted(ok, key=lambda s: s.t_sent):
        v = s.version or 0
        if s.task == STATIC:
            if v != sc.static_version:
                violations.append(f"{s.who}: static task served at version {v}, not {sc.static_version}")
            continue
        key = (s.who, s.replica)
        if v < last.get(key, 0):
            violations.append(f"{s.who} on {s.replica}: version {v} after {last[key]}")
        last[key] = max(v, last.get(key, 0))
        if v not in put_start or put_start[v] > s.t_recv:
            violations.append(f"{s.who}: version {v} was not (yet) uploaded")
        if s.replica == sc.upload:  # read-your-writes on the replica that acknowledged the upload
            newest = max((ver for ver, t in acked.items() if t <= s.t_sent), default=0)
            if v < newest:
                violations.append(f"{s.who} on the uploading replica: version {v} after v{newest} was acked")
    stale_probes = sum(sw.probes - 1 for sw in sc.swaps if sc.measure == sc.upload)
    unconverged = [sw.version for sw in sc.swaps if sw.latency_s is None]
    violations += [f"version {v}: not served within {CONVERGE_S} s of its ack" for v in unconverged]
    violations += [f"upload failed: {e}" for e in sc.put_errors]
    load_first: list[
        float
    ] = []  # t_ack -> first load request sent after the ack served on >= the new version
    load = sorted(
        (s for s in ok if s.who.startswith("load") and s.replica == sc.measure), key=lambda s: s.t_sent
    )
    for sw in sc.swaps:
        after = [
            s for s in load if s.task == SWAPPED and s.t_sent >= sw.t_ack and (s.version or 0) >= sw.version
        ]
        if after:
            load_first.append(after[0].t_recv - sw.t_ack)
    distinct: dict[tuple[str, int | None, str, int], set[tuple[int, ...]]] = {}
    for s in ok:
        if s.tokens is not None:
            distinct.setdefault((s.task, s.version, s.prompt, s.new_tokens), set()).add(s.tokens)
    multi = sum(1 for toks in distinct.values() if len(toks) > 1)
    lat = [sw.latency_s for sw in sc.swaps if sw.latency_s is not None]
    base = [sw.baseline_s for sw in sc.swaps if sw.baseline_s is not None]
    extra = [sw.latency_s - sw.baseline_s for sw in sc.swaps if sw.latency_s and sw.baseline_s]
    load_lat = [s.t_recv - s.t_sent for s in ok if s.who.startswith("load")]
    return {
        "swaps": len(sc.swaps),
        "latency_s": lat,
        "probes": [sw.probes for sw in sc.swaps],
        "baseline_s": base,
        "extra_over_baseline_s": extra,
        "load_first_s": load_first,
        "load_request_s": load_lat,
        "requests": len(sc.samples),
        "load_requests": sum(1 for s in sc.samples if s.who.startswith("load")),
        "errors": len(errors) + len(sc.put_errors),
        "error_examples": [f"{s.who}: {s.error}" for s in errors[:5]] + sc.put_errors[:5],
        "violations": len(violations),
        "violation_examples": violations[:10],
        "stale_probes_same_replica": stale_probes,
        "versions_with_several_outputs": multi,
        "version_prompt_pairs": len(distinct),
        "window_s": sc.window_s,
    }


def ms(x: float) -> str:
    return f"{1e3 * x:.0f}"


def target_s(sc: Scenario, r: dict[str, Any]) -> tuple[float, str]:
    base = quantile(r["baseline_s"], 0.99) if r["baseline_s"] else 0.0
    if sc.measure == sc.upload:
        return base + SAME_REPLICA_SLACK_S, f"<= baseline p99 + 100 ms = {ms(base + SAME_REPLICA_SLACK_S)} ms"
    limit = base + OTHER_REPLICA_SLACK_S
    return limit, f"<= baseline p99 + 1 s (store poll interval) = {ms(limit)} ms"


def render(
    args: argparse.Namespace, scenarios: list[Scenario], results: list[dict[str, Any]], hw: str
) -> str:
    lines = [
        "# hot swap: upload acknowledged -> first request served on the new version, under load",
        "",
        hw,
        f"- {args.swaps} swaps per scenario of a prompt-tuning task ({args.virtual_tokens} virtual tokens, "
        f"new random embeddings each time) while {args.clients} clients send /generate back to back "
        f"(greedy, {args.new_tokens} new tokens; 2/3 to the swapped task, 1/3 to a static one)",
        "- swap latency = PUT 201 received -> response of the first probe request (max_new_tokens=1, sent "
        "back to back after the ack) that reports the new task_version; it includes that request's latency",
        "- baseline = one static-task probe request (max_new_tokens=1) right after each swap, same load; "
        "swap - baseline = the same swap's latency minus its baseline (the cost of a new version's first "
        "request: artifact read, validation, KV prefix); load first = t_ack -> first load request sent after "
        "the ack served on the new version (or a newer one: the next swap does not wait for the load)",
        "- errors = non-2xx or exception on any request or upload; violations = task_version going back "
        "for a client, a version not (yet) uploaded, older than an acked upload on the uploading replica, or "
        "never served within 10 s",
        "",
        "| scenario | swap p50 ms | swap p99 ms | swap max ms | baseline p50 / p99 ms "
        "| swap - baseline p50 ms | load first p50 / p99 ms | requests during swaps | errors | violations |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for sc, r in zip(scenarios, results, strict=True):
        lat, base, lf = r["latency_s"], r["baseline_s"], r["load_first_s"]
        q = lambda xs, p: ms(quantile(xs, p)) if xs else "-"  # noqa: E731
        lines.append(
            f"| {sc.name} | {q(lat, 0.5)} | {q(lat, 0.99)} | {ms(max(lat)) if lat else '-'} | "
            f"{q(base, 0.5)} / {q(base, 0.99)} | {q(r['extra_over_baseline_s'], 0.5)} | "
            f"{q(lf, 0.5)} / {q(lf, 0.99)} | {r['requests']} | "
            f"{r['errors']} | {r['violations']} |"
        )
    lines.append("")
    for sc, r in zip(scenarios, results, strict=True):
        extra = []
        if sc.measure == sc.upload:
            extra.append(f"probes needed > 1 (stale after the ack): {r['stale_probes_same_replica']}")
        else:
            stale = sum(p - 1 for p in r["probes"])
            extra.append(
                f"probe requests answered with the old version (not yet propagated): {stale} in "
                f"{len(r['probes'])} swaps, at most {max(r['probes'], default=1) - 1} in one swap"
            )
        lr = r["load_request_s"]
        extra.append(f"load request p50 {ms(statistics.median(lr)) if lr else '-'} ms")
        extra.append(
            f"(version, prompt) pairs with more than one greedy output: {r['versions_with_several_outputs']} "
            f"of {r['version_prompt_pairs']}"
        )
        extra.append(f"{r['load_requests']} load requests in {r['window_s']:.1f} s")
        lines.append(f"- {sc.name}: " + "; ".join(extra))
        for ex in r["error_examples"] + r["violation_examples"]:
            lines.append(f"  - {ex}")
    lines.append("")
    for g in goals(scenarios, results):
        lines.append(f"- {g.measure}: **{g.measured}** (goal {g.target}: {'met' if g.met else 'NOT met'})")
    lines.append("")
    return "\n".join(lines)


def goals(scenarios: list[Scenario], results: list[dict[str, Any]]) -> list[Goal]:
    out = []
    for sc, r in zip(scenarios, results, strict=True):
        out.append(Goal(f"hot swap errors during swaps, {sc.name}", "0", str(r["errors"]), r["errors"] == 0))
        out.append(
            Goal(
                f"hot swap stale/unknown versions, {sc.name}",
                "0",
                str(r["violations"]),
                r["violations"] == 0,
            )
        )
        limit, text = target_s(sc, r)
        lat = r["latency_s"]
        p99 = quantile(lat, 0.99) if lat else float("inf")
        out.append(Goal(f"hot swap latency p99 (ms), {sc.name}", text, ms(p99) if lat else "-", p99 <= limit))
    return out


def plot(scenarios: list[Scenario], results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for (sc, r), color in zip(zip(scenarios, results, strict=True), colors, strict=False):
        for key, style, label in (("latency_s", "-", "probe"), ("load_first_s", ":", "first load request")):
            xs = sorted(1e3 * x for x in r[key])
            if xs:
                ys = [0.0] + [(i + 1) / len(xs) for i in range(len(xs))]
                xs = [xs[0], *xs]
                ax.step(xs, ys, where="post", linestyle=style, color=color, label=f"{sc.name}: {label}")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("upload acknowledged -> served on the new version (ms)")
    ax.set_ylabel("fraction of swaps")
    ax.set_title("hot swap latency under load (CDF)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    savefig(fig, path)
    plt.close(fig)
