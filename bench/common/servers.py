"""Processes the HTTP benchmarks start and stop by PID: `softserve serve` and redis-server on free ports."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from server.dev_process import ServeProcess as DevServeProcess
from server.dev_process import free_port, stop_process

STARTUP_S = 180.0


def exit_on_sigterm() -> None:
    """SIGTERM (`kill`, `timeout`) raises SystemExit in the benchmark, so its `finally` stops the servers it
    started in their own sessions; the default action would leave them running."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
        signal.signal(signal.SIGTERM, handler)


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


class ServeProcess(DevServeProcess):
    """`python -m server.cli serve` on a free loopback port, in its own session (Ctrl-C reaches only the
    benchmark, which stops it); output in a log file; no API or admin key. --device, --dtype, --model and
    --threads (OMP_NUM_THREADS) come from the benchmark's arguments, `env` adds settings."""

    def __init__(
        self, args: argparse.Namespace, store: str, log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "SOFTSERVE_LOG_LEVEL": "WARNING", **(env or {})}
        for name in ("SOFTSERVE_ADMIN_KEY", "SOFTSERVE_API_KEY"):  # the benchmarks send no keys
            full_env.pop(name, None)
        if args.threads:  # torch in the server reads it at start-up
            full_env["OMP_NUM_THREADS"] = str(args.threads)
        flags = ["--store", store, "--device", args.device, "--dtype", args.dtype]
        if args.model:
            flags += ["--model", args.model]
        exit_on_sigterm()
        super().__init__(flags, full_env, log_path, startup_s=STARTUP_S, new_session=True)

    def stop(self, wait_s: float = 15.0) -> None:
        """SIGTERM (the server drains), SIGKILL after wait_s."""
        super().stop(wait_s)
