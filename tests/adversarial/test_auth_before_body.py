"""Uploads without a valid admin key are refused (401) before their body is read, on real uvicorn.

The app is wrapped in an ASGI layer that counts the body bytes it pulls from uvicorn, so "not read or
spooled" is measured where it happens: a refused upload hands the app zero bytes. Over a raw socket the
401 arrives after the first MiB of a 60 MB upload, and the server never takes in the rest.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from api_helpers import prompt_artifact_bytes, tiny_runner
from conftest import free_port
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prompt_store.backends import DiskStore
from server.app import create_app
from server.drain import uvicorn_config
from server.settings import Settings

ADMIN, GEN = "admin-key-for-tests-0002", "gen-key-for-tests-0002"
UPLOAD = 60 * 1024 * 1024
FIRST = 1024 * 1024
BUFFERS_BOUND = 24 * 1024 * 1024  # loopback socket buffers on both sides stay well below this


class BodyCounter:
    """Counts the request-body bytes the app receives (what FastAPI would parse or spool)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.body_bytes = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counted() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                self.body_bytes += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, BodyCounter, object]]:
    tmp = tmp_path_factory.mktemp("gate")
    cfg = Settings(store=f"disk:{tmp / 'store'}", admin_key=ADMIN, api_key=GEN, _env_file=None)
    app = create_app(cfg, runner=tiny_runner(), store=DiskStore(tmp / "store"))
    counter = BodyCounter(app)
    port = free_port()
    config = uvicorn_config(app, "127.0.0.1", port, cfg.drain_timeout_s, "warning")
    config.app = counter  # the same uvicorn configuration as `softserve serve`, around the counter
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield port, counter, app.state.softserve
    srv.should_exit = True
    thread.join(30)


def read_head(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            part = sock.recv(65536)
            if not part:
                break
            data += part
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def multipart_head(path: str, method: str, auth: str | None, length: int) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=xyz\r\n"
    head += f"Content-Length: {length}\r\n"
    if auth is not None:
        head += f"Authorization: Bearer {auth}\r\n"
    return (head + "\r\n").encode()


@pytest.mark.parametrize(
    ("method", "path", "auth"),
    [
        ("PUT", "/tasks/big", "wrong-key-0123456789"),
        ("PUT", "/tasks/big", None),
        ("PUT", "/tasks/big", GEN),  # the generation key never grants writes
        ("POST", "/tasks/big/compress", "wrong-key-0123456789"),
    ],
    ids=["wrong-key", "no-key", "generation-key", "compress"],
)
def test_refused_before_the_body_is_read(server, method: str, path: str, auth: str | None) -> None:  # type: ignore[no-untyped-def]
    port, counter, _ = server
    before = counter.body_bytes
    chunk = b"-" * FIRST
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(multipart_head(path, method, auth, UPLOAD) + chunk)
        readable, _, _ = select.select([sock], [], [], 5.0)  # today: nothing until all 60 MB are in
        assert readable, "no answer after the first MiB: the server is waiting for the whole body"
        head = read_head(sock, 5.0)
        assert head.startswith(b"HTTP/1.1 401 "), head[:300]
        assert b"connection: close" in head.lower()
        sent = FIRST  # keep pushing: the server has closed and takes in at most its socket buffers
        try:
            sock.settimeout(2)
            while sent < UPLOAD:
                sock.sendall(chunk)
                sent += len(chunk)
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            pass
    assert sent < BUFFERS_BOUND, f"the server kept reading: {sent} bytes accepted"
    assert counter.body_bytes == before, "the app received body bytes of a refused upload"


def test_expect_continue_is_answered_401_without_a_body(server) -> None:  # type: ignore[no-untyped-def]
    port, counter, _ = server
    before = counter.body_bytes
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        head = multipart_head("/tasks/big", "PUT", "wrong-key-0123456789", UPLOAD)
        sock.sendall(head.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"))
        response = read_head(sock, 5.0)
    assert response.startswith(b"HTTP/1.1 401 "), response[:300]  # not "100 Continue"
    assert counter.body_bytes == before


def test_valid_admin_key_still_uploads(server) -> None:  # type: ignore[no-untyped-def]
    port, counter, state = server
    data = prompt_artifact_bytes("ok", state.runner.fingerprint)
    files = {"file": ("ok.safetensors", data, "application/octet-stream")}
    url = f"http://127.0.0.1:{port}"
    before = counter.body_bytes
    r = httpx.put(f"{url}/tasks/ok", files=files, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert r.status_code == 201, r.text
    assert counter.body_bytes - before > len(data)  # this one was read, through the same counter
    body = {"task_id": "ok", "prompt": "hi", "max_new_tokens": 2}
    assert (
        httpx.post(f"{url}/generate", json=body, headers={"Authorization": f"Bearer {GEN}"}).status_code
        == 200
    )
