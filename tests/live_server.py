"""Real servers for fault tests: a `softserve serve` subprocess, or uvicorn in a thread (state reachable)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from api_helpers import VOCAB, tiny_runner
from conftest import free_port, tiny_llama
from tiny_tokenizer import tiny_tokenizer

from prompt_store.backends import DiskStore, Store
from server.app import create_app
from server.drain import uvicorn_config
from server.settings import Settings

STARTUP_S = 90.0


def save_tiny_model(folder: Path) -> Path:
    tiny_llama(seed=0, vocab_size=VOCAB).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


class ServerProcess:
    """`python -m server.cli serve` on a free loopback port, its output in a log file."""

    def __init__(self, model_dir: Path, store: str, log_path: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "SOFTSERVE_STORE_POLL_INTERVAL": "0.5",
            "SOFTSERVE_LOG_LEVEL": "INFO",
            **env,
        }
        cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--model", str(model_dir), "--store", store]
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {STARTUP_S} s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@contextmanager
def threaded_server(
    tmp_path: Path, store: Store | None = None, runner: Any = None, **settings: Any
) -> Iterator[tuple[str, Any]]:
    """uvicorn in a thread on a free loopback port, serving the tiny model (or `runner`); yields (base URL,
    state)."""
    port = free_port()
    cfg = Settings(store=f"disk:{tmp_path / 'store'}", store_poll_interval=0.2, **settings)
    app = create_app(cfg, runner=runner or tiny_runner(), store=store or DiskStore(tmp_path / "store"))
    config = uvicorn_config(app, "127.0.0.1", port, cfg.drain_timeout_s, "warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "uvicorn thread died during start-up"
        assert time.monotonic() < deadline, "uvicorn did not start within 30 s"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app.state.softserve
    finally:
        server.should_exit = True
        thread.join(30)
