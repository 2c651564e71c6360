"""Helpers for the fine-tuning tests: training files, polling, real `python -m jobs.worker` processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TERMINAL = ("succeeded", "failed", "cancelled")
HEARTBEAT_TIMEOUT_S = 3.0


def chat_lines(n: int, prefix: str = "w") -> bytes:
    """n chat examples: the user says `<prefix><i>`, the assistant answers it upper-cased."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"{prefix}{i}"},
                {"role": "assistant", "content": f"{prefix}{i}".upper()},
            ]
        }
        for i in range(n)
    ]
    return "\n".join(json.dumps(r) for r in rows).encode() + b"\n"


def method(steps: int, m: int = 4, batch: int = 4, kind: str = "prompt_tuning") -> dict[str, Any]:
    return {
        "type": kind,
        kind: {"hyperparameters": {"steps": steps, "batch_size": batch, "num_virtual_tokens": m}},
    }


def wait_for(probe: Callable[[], Any], what: str, timeout: float = 120.0, every: float = 0.1) -> Any:
    """Poll `probe` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def worker_env(model_dir: Path, store: str, work_dir: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "SOFTSERVE_MODEL": str(model_dir),
        "SOFTSERVE_STORE": store,
        "SOFTSERVE_DEVICE": "cpu",
        "SOFTSERVE_DTYPE": "float32",
        "SOFTSERVE_JOB_WORK_DIR": str(work_dir),
        "SOFTSERVE_JOB_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S),
        **extra,
    }


def start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """`softserve worker`, a real process (it execs `python -m jobs.worker`: the PID stays); stopped by the
    caller by that PID."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "server.cli", "worker"], env=env, stdout=log, stderr=subprocess.STDOUT
        )


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)
