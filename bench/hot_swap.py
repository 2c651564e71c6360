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
--threads N sets OMP_NUM_THREADS=N for the servers (default 1: several servers and the load clients share
the CPU, and oversubscribed OpenMP threads can slow decoding down by 10x or more, spinning at barriers;
--threads 0 leaves torch's default).
Writes bench/results/hot_swap.md, .json and a latency CDF bench/results/hot_swap.png.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.artifacts import PromptTuningMaker, upload  # noqa: E402
from common.hot_swap_analysis import (  # noqa: E402
    CONVERGE_S,
    STATIC,
    SWAPPED,
    Sample,
    Scenario,
    Swap,
    analyse,
    goals,
    ms,
    plot,
    render,
)
from common.servers import RedisServer, ServeProcess  # noqa: E402
from harness import QUESTIONS, RESULTS, add_device_args, write_report  # noqa: E402

# ---- load, probes, swaps --------------------------------------------------------------------


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


def run_scenario(sc: Scenario, args: argparse.Namespace, maker: PromptTuningMaker, seed0: int) -> None:
    admin = httpx.Client(timeout=120)
    probe = httpx.Client(timeout=120)
    for task, seed in ((SWAPPED, seed0), (STATIC, seed0 + 999)):
        r = upload(admin, sc.upload, task, maker.make(task, args.virtual_tokens, seed))
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
        r = upload(admin, sc.upload, SWAPPED, data)
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
    parser.set_defaults(threads=1)
    args = parser.parse_args()
    t0 = time.monotonic()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    maker = PromptTuningMaker(args.model)
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(wanted) - {"disk", "redis", "redis2"}
    if unknown:
        raise SystemExit(f"unknown scenarios: {sorted(unknown)}")
    tmp = Path(tempfile.mkdtemp(prefix="hot-swap-"))
    redis = RedisServer() if any(w.startswith("redis") for w in wanted) else None
    names = {
        "disk": "disk, one replica",
        "redis": "redis, one replica",
        "redis2": "redis, two replicas (upload A, measure B)",
    }
    scenarios: list[Scenario] = []
    results: list[dict[str, Any]] = []
    fleets: list[list[ServeProcess]] = []
    try:
        for idx, which in enumerate(wanted):  # all servers start at once; idle ones wait on a condition
            store = f"disk:{tmp / 'store'}" if which == "disk" else redis.url(idx)  # type: ignore[union-attr]
            n = 2 if which == "redis2" else 1
            fleets.append([ServeProcess(args, store, tmp / f"{which}-{i}.log") for i in range(n)])
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
