"""The stack checks of `make docker-e2e` (docker/e2e/run.sh starts the engine and builds the images first).

Runs docker/compose.yml + docker/e2e/compose.e2e.yml with docker-compose and checks, through nginx unless
stated: readiness, uploads (a PEFT adapter and a softserve artifact), generation on each task by each
replica, a hot swap under load, `restart server-1` under load, down/up keeping the tasks (Redis AOF), the
trainer profile, non-root processes, healthchecks. Each step is appended to WORK/steps.jsonl (name, ok,
seconds, detail); docker/e2e/report.py turns them into bench/results/docker_e2e.md/.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PROMPT = "The capital of France is"


class Steps:
    """Timed steps, each appended to steps.jsonl as it ends (so a failure still leaves the earlier ones)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextmanager
    def step(self, name: str) -> Iterator[dict[str, Any]]:
        detail: dict[str, Any] = {}
        start = time.monotonic()
        print(f"== {name}", flush=True)
        try:
            yield detail
        except BaseException as exc:
            detail["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            self._write(name, False, time.monotonic() - start, detail)
            raise
        self._write(name, True, time.monotonic() - start, detail)

    def _write(self, name: str, ok: bool, seconds: float, detail: dict[str, Any]) -> None:
        row = {"step": name, "ok": ok, "seconds": round(seconds, 1), "detail": detail}
        print(f"   {'ok' if ok else 'FAILED'} {seconds:.1f}s {json.dumps(detail)[:400]}", flush=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


class Stack:
    """docker/compose.yml + docker/e2e/compose.e2e.yml, rendered once by `docker-compose config` with the
    `ports:` of host-network services dropped (Docker ignores them there, but docker-compose 1.29 refuses
    the pair and an override cannot remove a list entry); every later command runs that rendered file."""

    def __init__(self, env_file: Path, project: str) -> None:
        self.env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
        self.project = project
        self.prefix = ["docker-compose", "-p", project, "--env-file", str(env_file)]
        files = ["-f", str(ROOT / "docker/compose.yml"), "-f", str(ROOT / "docker/e2e/compose.e2e.yml")]
        config = yaml.safe_load(self._run([*self.prefix, *files, "--profile", "trainer", "config"]))
        for service in config["services"].values():
            if service.get("network_mode") == "host":
                service.pop("ports", None)
        rendered = env_file.parent / "compose.rendered.yml"
        rendered.write_text(yaml.safe_dump(config, sort_keys=False))
        self.prefix += ["-f", str(rendered)]
        self.nginx = f"http://127.0.0.1:{self.env['E2E_NGINX_PORT']}"
        self.replicas = {
            "server-1": f"http://127.0.0.1:{self.env['E2E_SERVER_1_PORT']}",
            "server-2": f"http://127.0.0.1:{self.env['E2E_SERVER_2_PORT']}",
        }
        self.admin = {"Authorization": f"Bearer {self.env['SOFTSERVE_ADMIN_KEY']}"}

    def compose(self, *args: str, timeout: float = 900) -> str:
        return self._run([*self.prefix, *args], timeout)

    @staticmethod
    def _run(cmd: list[str], timeout: float = 900) -> str:
        proc = subprocess.run(  # noqa: S603 - docker-compose with this run's fixed arguments
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[-3:])}: rc {proc.returncode}: {proc.stderr[-1500:]}")
        return proc.stdout

    def container(self, service: str) -> str:
        cid = self.compose("ps", "-q", service).strip()
        if not cid:
            raise RuntimeError(f"no container for {service}")
        return cid


def docker(*args: str) -> str:
    cmd = ["docker", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120).stdout  # noqa: S603


def wait_for(what: str, check: Callable[[], bool], timeout: float, every: float = 0.5) -> float:
    """Seconds until check() is true; raises after `timeout` seconds."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if check():
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


def ready(url: str) -> bool:
    return httpx.get(f"{url}/readyz", timeout=5).status_code == 200


def generate(url: str, task_id: str, timeout: float = 120) -> httpx.Response:
    body = {"task_id": task_id, "prompt": PROMPT, "max_new_tokens": 4}
    return httpx.post(f"{url}/generate", json=body, timeout=timeout)


def serves(url: str, task_id: str, version: int) -> bool:
    r = generate(url, task_id)
    return r.status_code == 200 and r.json()["task_version"] == version


class Load:
    """A small bounded load through nginx: `workers` clients, each one request at a time, every answer
    recorded (anything but 200, or a transport error, counts as a failure)."""

    def __init__(self, url: str, task_id: str, workers: int = 2) -> None:
        self.url, self.task_id = url, task_id
        self.stop = threading.Event()
        self.codes: dict[str, int] = {}
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def _run(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self.stop.is_set():
                try:
                    r = client.post(
                        f"{self.url}/generate",
                        json={"task_id": self.task_id, "prompt": PROMPT, "max_new_tokens": 2},
                    )
                    key = str(r.status_code)
                    bad = None if r.status_code == 200 else f"{r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as exc:
                    key, bad = "transport", f"{type(exc).__name__}: {exc}"
                with self.lock:
                    self.codes[key] = self.codes.get(key, 0) + 1
                    if bad:
                        self.failures.append(bad)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=150)

    def summary(self) -> dict[str, Any]:
        return {"requests": sum(self.codes.values()), "codes": self.codes, "failures": self.failures[:5]}


def artifacts() -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """Two versions of a prompt-tuning artifact and a PEFT PROMPT_TUNING adapter for the served model."""
    from prompt_store import make_artifact, to_bytes
    from runtime.model_runner import load_model
    from tests.upload_helpers import peft_adapter, prompt_tensors

    base = load_model(None, dtype="float32", device="cpu").fingerprint
    v1, v2 = (
        to_bytes(
            make_artifact(
                "e2e-pt", "prompt_tuning", {"num_virtual_tokens": 4}, prompt_tensors(base, 4, s), base
            )
        )
        for s in (1, 2)
    )
    adapter = peft_adapter(base, m=5, seed=3)
    return v1, v2, [(name, adapter[name]) for name in ("adapter_config.json", "adapter_model.safetensors")]


def upload(stack: Stack, task_id: str, files: list[tuple[str, bytes]]) -> int:
    parts = [("file", (name, data, "application/octet-stream")) for name, data in files]
    r = httpx.put(f"{stack.nginx}/tasks/{task_id}", files=parts, headers=stack.admin, timeout=120)
    if r.status_code != 201:
        raise RuntimeError(f"PUT /tasks/{task_id}: {r.status_code} {r.text[:300]}")
    return int(r.json()["version"])


def all_ready(stack: Stack) -> bool:
    return ready(stack.nginx) and all(ready(url) for url in stack.replicas.values())


def check_served(stack: Stack, tasks: dict[str, int], timeout: float) -> dict[str, float]:
    """Every task at its version through nginx and on each replica directly; seconds each took to show."""
    seen = {}
    for task_id, version in tasks.items():
        for name, url in {"nginx": stack.nginx, **stack.replicas}.items():
            seen[f"{task_id}@{name}"] = round(
                wait_for(
                    f"{task_id} v{version} on {name}",
                    lambda u=url, t=task_id, v=version: serves(u, t, v),
                    timeout,
                ),
                2,
            )
    return seen


def run(stack: Stack, steps: Steps) -> None:
    poll = float(stack.env.get("SOFTSERVE_STORE_POLL_INTERVAL", "1.0"))
    with steps.step("artifacts (host)") as d:
        v1, v2, peft_files = artifacts()
        d["bytes"] = {"e2e-pt": len(v1), "e2e-peft": sum(len(b) for _, b in peft_files)}
    with steps.step("up (cold: empty volumes)") as d:
        start = time.monotonic()
        stack.compose("up", "-d", "--no-build")  # returns once the replicas are healthy (nginx waits)
        wait_for("stack ready", lambda: all_ready(stack), 900, every=1)
        d["seconds_to_ready"] = round(time.monotonic() - start, 1)
    with steps.step("readyz and uploads through nginx") as d:
        d["readyz"] = httpx.get(f"{stack.nginx}/readyz", timeout=5).json()
        tasks = {"e2e-pt": upload(stack, "e2e-pt", [("e2e-pt.safetensors", v1)])}
        tasks["e2e-peft"] = upload(stack, "e2e-peft", peft_files)
        d["versions"] = dict(tasks)
    with steps.step("generate on each task (nginx, each replica)") as d:
        d["seconds_to_serve"] = check_served(stack, tasks, timeout=30)
    with steps.step("hot swap v2 under load") as d:
        with Load(stack.nginx, "e2e-pt") as load:
            time.sleep(2)
            tasks["e2e-pt"] = upload(stack, "e2e-pt", [("e2e-pt.safetensors", v2)])
            # From the upload's 201, each replica watched by its own thread; each figure includes one
            # generation round trip under the load (the replica's answer is the only view of its version).
            seen: dict[str, float] = {}
            watchers = [
                threading.Thread(
                    target=lambda n=name, u=url: seen.__setitem__(
                        n, wait_for(f"v2 on {n}", lambda: serves(u, "e2e-pt", tasks["e2e-pt"]), 60, every=0.1)
                    )
                )
                for name, url in stack.replicas.items()
            ]
            for w in watchers:
                w.start()
            for w in watchers:
                w.join()
            assert len(seen) == 2, "a replica did not serve v2 within 60 s"
            d["seconds_until_serving_v2"] = {name: round(t, 2) for name, t in seen.items()}
            d["seconds_until_both_replicas_serve_v2"] = round(max(seen.values()), 2)
            d["poll_interval_s"] = poll
            time.sleep(2)
        d["load"] = load.summary()
        assert not load.failures, f"requests failed during the hot swap: {load.failures[:3]}"
        # The poll interval plus a generation round trip on 2 busy cores.
        assert d["seconds_until_both_replicas_serve_v2"] <= poll + 5, "v2 not served within the poll interval"
    with steps.step("restart server-1 under load") as d:
        with Load(stack.nginx, "e2e-pt") as load:
            time.sleep(2)
            start = time.monotonic()
            stack.compose("restart", "server-1")
            d["restart_command_s"] = round(time.monotonic() - start, 1)
            wait_for("server-1 ready again", lambda: ready(stack.replicas["server-1"]), 600)
            d["seconds_until_server_1_ready"] = round(time.monotonic() - start, 1)
            time.sleep(3)
        d["load"] = load.summary()
        assert not load.failures, f"requests failed at nginx during the restart: {load.failures[:3]}"
    with steps.step("down, up (warm: volumes kept), tasks still served") as d:
        stack.compose("down")
        start = time.monotonic()
        stack.compose("up", "-d", "--no-build")
        wait_for("stack ready", lambda: all_ready(stack), 900, every=1)
        d["seconds_to_ready"] = round(time.monotonic() - start, 1)
        listed = httpx.get(f"{stack.nginx}/tasks", timeout=10).json()
        d["tasks_listed"] = listed
        d["seconds_to_serve"] = check_served(stack, tasks, timeout=30)
    with steps.step("trainer profile: train a few steps, publish") as d:
        out = stack.compose("--profile", "trainer", "run", "--rm", "trainer", timeout=1800)
        d["trainer_tail"] = out.strip().splitlines()[-3:]
        d["seconds_to_serve"] = check_served(stack, {"sentiment": 1}, timeout=30)
    with steps.step("non-root processes, healthchecks healthy") as d:
        d["uids"] = {}
        project = stack.project
        names = docker(
            "ps", "--filter", f"label=com.docker.compose.project={project}", "--format", "{{.Names}}"
        )
        for name in names.split():
            top = docker("top", name, "-eo", "pid,uid").splitlines()[1:]  # docker top needs the pid column
            uids = {line.split()[1] for line in top}
            d["uids"][name] = sorted(uids)
            assert "0" not in uids, f"{name} runs a process as root: {uids}"
        assert len(d["uids"]) >= 4, f"expected redis, 2 replicas and nginx running: {names.split()}"
        user = docker("image", "inspect", "-f", "{{.Config.User}}", stack.env["SOFTSERVE_IMAGE"]).strip()
        d["softserve_image_user"] = user
        assert user and not user.startswith(("0", "root")), f"softserve image user {user!r}"

        def healthy() -> bool:
            states = {
                s: docker("inspect", "-f", "{{.State.Health.Status}}", stack.container(s)).strip()
                for s in ("redis", "server-1", "server-2")
            }
            d["health"] = states
            return all(v == "healthy" for v in states.values())

        wait_for("healthchecks healthy", healthy, 120, every=2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--env-file", type=Path, required=True)
    p.add_argument("--steps", type=Path, required=True, help="steps.jsonl to append to")
    p.add_argument("--project", default="softserve-e2e")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    stack = Stack(args.env_file, args.project)
    run(stack, Steps(args.steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
