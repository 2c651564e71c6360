"""Hot swap benchmark: upload acknowledged -> first request served on the new version, under load.

Real `softserve serve` processes (embedded SmolLM2 unless --model) and a real redis-server on a free loopback
port (started and stopped here by PID). Three scenarios, run one after the other:
- disk, one replica: disk store; upload to and measure on the same replica.
- redis, one replica: Redis store; upload to and measure on the same replica.
- redis, two replicas: two servers on one Redis; upload to replica A, measure on replica B (the new version
  reaches B through the store's watch: Redis pub/sub, polling every SOFTSERVE_STORE_POLL_INTERVAL = 1 s
  as the fallback). Load clients alternate between A and B.
Each scenario uploads version 1 of the swapped task and of a second, static task, starts --clients load
threads that send /generate back to back (greedy, --new-tokens tokens; 2 of 3 requests for the swapped task,
1 of 3 for the static one), then does --swaps swaps: PUT /tasks/{id} with a prompt-tuning artifact of new
random embeddings (vocabulary-token init, --virtual-tokens rows, fingerprint of the served model);
t_ack = the PUT's 201. A probe then sends /generate (max_new_tokens=1) to the measuring replica back to back
until one returns task_version = the new version; swap latency = t_ack -> that response received (so it
includes one request's latency). After it, one probe of the static task gives the request latency under
the same load (baseline), then the next swap starts (after --gap s). Also reported: t_ack -> response of the
first load request sent after the ack that was served on the new version (or a newer one, when swaps are
faster than load requests).
Checked on every response: errors (non-2xx or exception), task_version never lower than the previous one of
the same client and task, never a version whose upload had not started, never older than an acknowledged
upload on the replica that took it (read-your-writes), the static task always at its one version; and, greedy
decoding being deterministic, the number of distinct token sequences per (task, version, prompt, new tokens)
(more than one would hint at a response labelled with one version but generated with another; batch-size
numerics can also do it).
Goals per scenario: 0 errors, 0 version violations; swap latency p99 <= baseline request p99 + 100 ms on
the uploading replica (the new version's first request reads the artifact and computes its KV prefix),
<= baseline p99 + 1 s (the default store poll interval, the bound without pub/sub) on the other replica.
--threads N sets OMP_NUM_THREADS=N for the servers: on a CPU shared with other jobs use --threads 1, as
oversubscribed OpenMP threads can slow decoding down by 10x or more (spinning at barriers).
Writes bench/results/hot_swap.md, .json and a latency CDF bench/results/hot_swap.png.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import QUESTIONS, RESULTS, Goal, add_device_args, savefig, write_report  # noqa: E402

from prompt_store import Fingerprint, make_artifact, to_bytes  # noqa: E402

SWAPPED, STATIC = "hs-swapped", "hs-static"
STARTUP_S = 180.0
CONVERGE_S = 10.0  # a probe giving up on a swap counts it as a violation
SAME_REPLICA_SLACK_S = 0.100  # a new version's first request: artifact read + validation + KV prefix
OTHER_REPLICA_SLACK_S = 1.0  # the default store poll interval (the bound without Redis pub/sub)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Redis:
    """A redis-server on a free loopback port, no persistence; stopped by its own PID."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        cmd = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start within 10 s")

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Server:
    """`python -m server.cli serve` on a free loopback port; output in a log file."""

    def __init__(self, args: argparse.Namespace, store: str, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "SOFTSERVE_LOG_LEVEL": "WARNING"}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--store", store, "--device", args.device, "--dtype", args.dtype]
        if args.model:
            cmd += ["--model", args.model]
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {STARTUP_S} s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# ---- artifacts ------------------------------------------------------------------------------


class ArtifactMaker:
    """Prompt-tuning artifacts for the served model: embeddings of random vocabulary tokens."""

    def __init__(self, model: str | None) -> None:
        from server.model_runner import load_model

        runner = load_model(model, dtype="float32", device="cpu")
        self.fingerprint: Fingerprint = runner.fingerprint
        self.weight = runner.model.get_input_embeddings().weight.detach().float().clone()  # [V, d]
        del runner
        gc.collect()

    def make(self, task_id: str, m: int, seed: int) -> bytes:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(100, min(10_000, self.weight.shape[0]), (m,), generator=g)
        prompt = self.weight[ids].clone()  # [m, d]
        art = make_artifact(
            task_id, "prompt_tuning", {"num_virtual_tokens": m}, {"prompt": prompt}, self.fingerprint
        )
        return to_bytes(art)


# ---- load, probes, swaps --------------------------------------------------------------------


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


def generate(client: httpx.Client, who: str, url: str, task: str, prompt: str, new_tokens: int) -> Sample:
    body = {"task_id": task, "prompt": prompt, "max_new_tokens": new_tokens, "temperature": 0.0}
    t_sent = time.monotonic()
    try:
        r = client.post(f"{url}/generate", json=body)
    except httpx.HTTPError as exc:
        return Sample(
            who, url, task, t_sent, time.monotonic(), prompt, new_tokens, error=f"{type(exc).__name__}: {exc}"
        )
    t_recv = time.monotonic()
    if r.status_code != 200:
        return Sample(
            who, url, task, t_sent, t_recv, prompt, new_tokens, error=f"HTTP {r.status_code}: {r.text[:200]}"
        )
    d = r.json()
    return Sample(
        who, url, task, t_sent, t_recv, prompt, new_tokens, int(d["task_version"]), tuple(d["tokens"])
    )


class LoadClient(threading.Thread):
    def __init__(self, index: int, url: str, new_tokens: int, stop: threading.Event) -> None:
        super().__init__(name=f"load-{index}", daemon=True)
        self.index, self.url, self.new_tokens, self.stop = index, url, new_tokens, stop
        self.samples: list[Sample] = []

    def run(self) -> None:
        with httpx.Client(timeout=120) as client:
            i = self.index
            while not self.stop.is_set():
                task = STATIC if i % 3 == 2 else SWAPPED
                prompt = QUESTIONS[i % len(QUESTIONS)]
                self.samples.append(generate(client, self.name, self.url, task, prompt, self.new_tokens))
                i += 1


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


def put(client: httpx.Client, url: str, task: str, data: bytes) -> httpx.Response:
    return client.put(f"{url}/tasks/{task}", files={"file": (f"{task}.safetensors", data)})


def run_scenario(sc: Scenario, args: argparse.Namespace, maker: ArtifactMaker, seed0: int) -> None:
    admin = httpx.Client(timeout=120)
    probe = httpx.Client(timeout=120)
    for task, seed in ((SWAPPED, seed0), (STATIC, seed0 + 999)):
        r = put(admin, sc.upload, task, maker.make(task, args.virtual_tokens, seed))
        if r.status_code != 201:
            raise RuntimeError(f"initial upload of {task} failed: {r.status_code} {r.text}")
        if task == SWAPPED:
            sc.initial_version = int(r.json()["version"])
        else:
            sc.static_version = int(r.json()["version"])
    for task in (SWAPPED, STATIC):  # the measuring replica has both (v1) before the load starts
        deadline = time.monotonic() + CONVERGE_S
        while generate(probe, "warmup", sc.measure, task, "Hi!", 1).version is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{sc.measure} never served {task}")
            time.sleep(0.05)
    payloads = [maker.make(SWAPPED, args.virtual_tokens, seed0 + 1 + i) for i in range(args.swaps)]
    stop = threading.Event()
    clients = [
        LoadClient(i, sc.load_urls[i % len(sc.load_urls)], args.new_tokens, stop) for i in range(args.clients)
    ]
    t_start = time.monotonic()
    for c in clients:
        c.start()
    time.sleep(0.5)  # every client has a request in flight
    try:
        for data in payloads:
            swap_once(sc, admin, probe, data)
            if args.gap:
                time.sleep(args.gap)
    finally:
        stop.set()
        for c in clients:
            c.join(120)
        admin.close()
        probe.close()
    sc.window_s = time.monotonic() - t_start
    for c in clients:
        sc.samples += c.samples


def swap_once(sc: Scenario, admin: httpx.Client, probe: httpx.Client, data: bytes) -> None:
    t_put = time.monotonic()
    try:
        r = put(admin, sc.upload, SWAPPED, data)
    except httpx.HTTPError as exc:
        sc.put_errors.append(f"{type(exc).__name__}: {exc}")
        return
    t_ack = time.monotonic()
    if r.status_code != 201:
        sc.put_errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
        return
    version = int(r.json()["version"])
    latency, n = None, 0
    while time.monotonic() - t_ack < CONVERGE_S:
        s = generate(probe, "probe", sc.measure, SWAPPED, "Hi!", 1)
        sc.samples.append(s)
        n += 1
        if s.version is not None and s.version >= version:
            latency = s.t_recv - t_ack
            break
        time.sleep(0.002)
    base = generate(probe, "baseline", sc.measure, STATIC, "Hi!", 1)
    sc.samples.append(base)
    baseline = base.t_recv - base.t_sent if base.error is None else None
    sc.swaps.append(Swap(version, t_put, t_ack, latency, n, baseline))


# ---- analysis -------------------------------------------------------------------------------


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


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


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks: servers and redis-server stopped


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_args(parser)
    parser.add_argument("--model", default=None, help="HF model name or path (default: embedded SmolLM2)")
    parser.add_argument("--swaps", type=int, default=50, help="swaps per scenario (default: 50)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent load clients (default: 4)")
    parser.add_argument(
        "--new-tokens", type=int, default=8, help="max_new_tokens of load requests (default: 8)"
    )
    parser.add_argument("--virtual-tokens", type=int, default=20, help="soft prompt rows (default: 20)")
    parser.add_argument("--gap", type=float, default=0.0, help="extra seconds between swaps (default: 0)")
    parser.add_argument(
        "--scenarios",
        default="disk,redis,redis2",
        help="comma list of disk, redis, redis2 (default: all three)",
    )
    args = parser.parse_args()
    t0 = time.monotonic()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    maker = ArtifactMaker(args.model)
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(wanted) - {"disk", "redis", "redis2"}
    if unknown:
        raise SystemExit(f"unknown scenarios: {sorted(unknown)}")
    tmp = Path(tempfile.mkdtemp(prefix="hot-swap-"))
    redis = Redis() if any(w.startswith("redis") for w in wanted) else None
    names = {
        "disk": "disk, one replica",
        "redis": "redis, one replica",
        "redis2": "redis, two replicas (upload A, measure B)",
    }
    scenarios: list[Scenario] = []
    results: list[dict[str, Any]] = []
    fleets: list[list[Server]] = []
    try:
        for idx, which in enumerate(wanted):  # all servers start at once; idle ones wait on a condition
            store = f"disk:{tmp / 'store'}" if which == "disk" else redis.url(idx)  # type: ignore[union-attr]
            n = 2 if which == "redis2" else 1
            fleets.append([Server(args, store, tmp / f"{which}-{i}.log") for i in range(n)])
        for fleet in fleets:
            for s in fleet:
                s.wait_ready()
        print(f"{sum(map(len, fleets))} servers ready after {time.monotonic() - t0:.1f} s", flush=True)
        for idx, (which, fleet) in enumerate(zip(wanted, fleets, strict=True)):
            urls = [s.url for s in fleet]
            sc = Scenario(names[which], urls[0], urls[-1], urls)
            ts = time.monotonic()
            run_scenario(sc, args, maker, seed0=10_000 * (idx + 1))
            r = analyse(sc)
            p50 = ms(statistics.median(r["latency_s"])) if r["latency_s"] else "-"
            print(
                f"{sc.name}: {len(sc.swaps)} swaps in {time.monotonic() - ts:.1f} s, errors {r['errors']}, "
                f"violations {r['violations']}, swap latency p50 {p50} ms",
                flush=True,
            )
            scenarios.append(sc)
            results.append(r)
            for s in fleet:
                s.stop()
    finally:
        for fleet in fleets:
            for s in fleet:
                s.stop()
        if redis is not None:
            redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    hw = (
        f"- model: {maker.fingerprint.name}; servers: --device {args.device} --dtype {args.dtype}, "
        f"{f'OMP_NUM_THREADS={args.threads}' if args.threads else 'torch default threads'}; "
        f"torch {torch.__version__}; {os.cpu_count()} cores"
    )
    report = render(args, scenarios, results, hw)
    data = {
        "args": vars(args),
        "scenarios": {sc.name: r for sc, r in zip(scenarios, results, strict=True)},
        "elapsed_s": time.monotonic() - t0,
    }
    write_report("hot_swap", report, goals(scenarios, results), data)
    plot(scenarios, results, RESULTS / "hot_swap.png")
    print(f"elapsed {time.monotonic() - t0:.1f} s")


if __name__ == "__main__":
    main()
