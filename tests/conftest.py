"""Shared fixtures: a real redis-server on a free loopback port, tiny deterministic models."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A real redis-server process owned by the test session; stopped by its own PID."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError(
                "redis-server is not installed; `make test` installs it (apt-get install redis-server)"
            )
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--maxmemory-policy",
                "noeviction",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start within 10 s")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture()
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """A clean database on the session's redis-server for each test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    yield redis_server.url
    client.flushdb()
    client.close()


def tiny_llama(seed: int = 0, vocab_size: int = 1000):  # type: ignore[no-untyped-def]
    """hidden 64, 2 layers, GQA (4 heads, 2 kv heads), deterministic weights (bench/common/tiny.py's model,
    512 positions, token ids 0/1/2 for pad/bos/eos)."""
    from bench.common.tiny import tiny_llama as bench_tiny_llama

    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    return bench_tiny_llama(vocab_size, seed, max_position_embeddings=512, **ids)


@pytest.fixture(scope="session")
def tiny_model():  # type: ignore[no-untyped-def]
    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_fingerprint(tiny_model):  # type: ignore[no-untyped-def]
    from prompt_store import Fingerprint

    return Fingerprint.from_model(tiny_model, "tiny-llama")
