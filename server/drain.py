"""Graceful shutdown: on SIGTERM/SIGINT keep answering while the engine drains, then let uvicorn exit.

uvicorn closes its listening socket as soon as it is told to exit, so nobody could see readiness go to
503 and new requests would get connection errors instead of a 503. `DrainingServer` puts a drain in
front: the first signal marks the app draining (`/readyz` -> 503, new generations -> 503 NotReady),
waits until the engine has nothing running or queued (at most `drain_timeout` s), and only then lets
uvicorn shut down (in-flight responses still finish sending). A second signal exits at once.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("softserve.drain")

POLL_S = 0.05
MAX_HEADER_BYTES = 64 * 1024  # request line + headers; larger (or endless) header blocks are refused


def uvicorn_config(
    app: FastAPI, host: str, port: int, drain_timeout: float, log_level: str
) -> uvicorn.Config:
    """The one uvicorn configuration of `softserve serve` (tests run the same one)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level.lower(),
        log_config=None,  # uvicorn's lines (access lines too) go to the app's handler, with the request id
        timeout_graceful_shutdown=int(drain_timeout) + 5,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_timeout = drain_timeout
        self._drain: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = getattr(self.app.state, "softserve", None)
        if self._drain is not None or state is None:  # second signal, or still starting: exit now
            self._exit(sig)
            return
        state.draining = True
        log.info("signal %d: draining (readiness 503) for up to %.0f s", sig, self.drain_timeout)
        self._drain = threading.Thread(target=self._drain_then_exit, args=(sig,), name="softserve-drain")
        self._drain.daemon = True
        self._drain.start()

    def _drain_then_exit(self, sig: int) -> None:
        engine = self.app.state.softserve.engine
        deadline = time.monotonic() + self.drain_timeout
        while time.monotonic() < deadline and any(engine.load()):  # running (incl. admitting) or waiting
            time.sleep(POLL_S)
        busy = engine.cancel()  # every request still waiting or running (none when drained)
        if busy:
            log.warning("drain timeout: %d requests still running are cancelled", busy)
        else:
            log.info("drained: no request running")
        self._exit(sig)

    def _exit(self, sig: int) -> None:
        if sig == signal.SIGTERM:
            # A drained SIGTERM is a clean stop (exit 0): uvicorn would re-raise it after shutdown.
            if self.should_exit:
                self.force_exit = True
            self.should_exit = True
            return
        super().handle_exit(sig, None)
