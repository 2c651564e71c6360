"""A `softserve serve` subprocess on a free loopback port, for the tests and the benchmarks (not used by the
server itself): started with given flags and environment, output in a log file, ready once GET /readyz
answers 200, stopped by its own PID."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], wait_s: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within wait_s (0: SIGKILL at once)."""
    if proc.poll() is not None:
        return
    if wait_s > 0:
        proc.terminate()
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    proc.wait(10)


class ServeProcess:
    """`python -m server.cli serve --host 127.0.0.1 --port P *flags`, run from the repository root with
    exactly `env`; `new_session` keeps a terminal's Ctrl-C from reaching it (the caller stops it)."""

    def __init__(
        self,
        flags: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        *,
        startup_s: float = 90.0,
        new_session: bool = False,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.startup_s = startup_s
        cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(  # noqa: S603 (this interpreter, the caller's flags)
                [*cmd, *flags],
                cwd=ROOT,
                env=dict(env),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=new_session,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 3000) -> str:
        return self.log()[-n:]

    def wait_ready(self) -> None:
        """Until GET /readyz answers 200; raises if the process exits or startup_s pass."""
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {self.startup_s:.0f} s:\n{self.log_tail()}")

    def stop(self, wait_s: float = 0.0) -> None:
        """SIGKILL (or SIGTERM first, waiting up to wait_s for the drain)."""
        stop_process(self.proc, wait_s)
