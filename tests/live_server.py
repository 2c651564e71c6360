"""Real servers for fault tests: a `softserve serve` subprocess, or uvicorn in a thread (state reachable)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from api_helpers import VOCAB, tiny_runner
from conftest import free_port, tiny_llama
from tiny_tokenizer import tiny_tokenizer

from prompt_store.backends import DiskStore, Store
from server.app import create_app
from server.dev_process import ServeProcess
from server.drain import uvicorn_config
from server.settings import Settings

STARTUP_S = 90.0


def save_tiny_model(folder: Path) -> Path:
    tiny_llama(seed=0, vocab_size=VOCAB).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


class ServerProcess(ServeProcess):
    """`python -m server.cli serve` for the tiny model in `model_dir`, INFO log lines in a log file."""

    def __init__(self, model_dir: Path, store: str, log_path: Path, **env: str) -> None:
        full_env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "SOFTSERVE_STORE_POLL_INTERVAL": "0.5",
            "SOFTSERVE_LOG_LEVEL": "INFO",
            **env,
        }
        flags = ["--model", str(model_dir), "--store", store]
        super().__init__(flags, full_env, log_path, startup_s=STARTUP_S)


@contextmanager
def threaded_server(
    tmp_path: Path,
    store: Store | None = None,
    runner: Any = None,
    store_spec: str | None = None,
    **settings: Any,
) -> Iterator[tuple[str, Any]]:
    """uvicorn in a thread on a free loopback port, serving the tiny model (or `runner`); yields (base URL,
    state). `store_spec`: SOFTSERVE_STORE when `store` is not the default disk store (e.g. a Redis URL)."""
    port = free_port()
    spec = store_spec or f"disk:{tmp_path / 'store'}"
    cfg = Settings(store=spec, store_poll_interval=0.2, **settings)
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
