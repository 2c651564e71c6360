"""Processes the HTTP benchmarks start and stop by PID: `softserve serve` and redis-server on free ports."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
STARTUP_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], wait_s: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within wait_s."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class RedisServer:
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
        stop_process(self.proc, 5)


class ServeProcess:
    """`python -m server.cli serve` on a free loopback port, in its own session (Ctrl-C reaches only the
    benchmark, which stops it); output in a log file; no API or admin key. --device, --dtype, --model and
    --threads (OMP_NUM_THREADS) come from the benchmark's arguments, `env` adds settings."""

    def __init__(
        self, args: argparse.Namespace, store: str, log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "SOFTSERVE_LOG_LEVEL": "WARNING", **(env or {})}
        for name in ("SOFTSERVE_ADMIN_KEY", "SOFTSERVE_API_KEY"):  # the benchmarks send no keys
            full_env.pop(name, None)
        if args.threads:  # torch in the server reads it at start-up
            full_env["OMP_NUM_THREADS"] = str(args.threads)
        cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--store", store, "--device", args.device, "--dtype", args.dtype]
        if args.model:
            cmd += ["--model", args.model]
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def wait_ready(self) -> None:
        """Until GET /readyz answers 200; raises if the process exits or STARTUP_S pass."""
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {STARTUP_S:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        stop_process(self.proc, 15)
