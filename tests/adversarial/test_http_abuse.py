"""Hostile HTTP on a real uvicorn (same config as `softserve serve`), over raw loopback sockets.

A chunked body with no Content-Length that never ends is cut off at the limit (413) without the server
reading (or buffering) the rest; a header block that is huge or has thousands of lines is refused; after
each, the server still answers.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time

import httpx
import pytest
from live_server import threaded_server

LIMIT = 64 * 1024
SEND_UP_TO = 64 * 1024 * 1024  # what an attacker would push if nobody stopped it
BUFFERS_BOUND = 24 * 1024 * 1024  # loopback socket buffers on both sides stay well below this


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    with threaded_server(tmp_path_factory.mktemp("abuse"), max_body_bytes=LIMIT) as (url, state):
        yield url, state


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def read_response(sock: socket.socket, timeout: float = 10.0) -> bytes:
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


def status_of(response: bytes) -> int | None:
    if not response.startswith(b"HTTP/1.1 "):
        return None
    return int(response.split(b" ", 2)[1])


def assert_responsive(url: str) -> None:
    assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    r = httpx.post(f"{url}/generate", json={"prompt": "still here", "max_new_tokens": 2}, timeout=30)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("path", "content_type"),
    [("/generate", "application/json"), ("/tasks/big", "multipart/form-data; boundary=xyz")],
)
def test_endless_chunked_body_is_413_and_not_read_past_the_limit(  # type: ignore[no-untyped-def]
    server, path: str, content_type: str
) -> None:
    url, _ = server
    chunk = b"x" * 65536
    frame = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\n"
    head += "Transfer-Encoding: chunked\r\n\r\n"
    if path.startswith("/tasks"):
        head = head.replace("POST", "PUT", 1)
    sent = 0
    with socket.create_connection(("127.0.0.1", port_of(url)), timeout=5) as sock:
        sock.sendall(head.encode())
        sock.settimeout(2)
        try:
            while sent < SEND_UP_TO:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    break  # the server answered (and stopped reading)
                sock.sendall(frame)
                sent += len(frame)
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading: our send buffer filled up, or it closed
        response = read_response(sock)
    assert status_of(response) == 413, response[:300]
    assert b"body_too_large" in response or b"413" in response
    assert sent < BUFFERS_BOUND, f"the server kept reading: {sent} bytes sent"
    assert_responsive(url)


@pytest.mark.parametrize(
    "headers",
    [
        "X-Big: " + "a" * (1024 * 1024) + "\r\n",  # one 1 MiB header
        "".join(f"X-H{i}: v\r\n" for i in range(20000)),  # thousands of headers
    ],
    ids=["huge-header", "20000-headers"],
)
def test_oversized_header_block_is_refused_and_server_stays_up(server, headers: str) -> None:  # type: ignore[no-untyped-def]
    url, _ = server
    t0 = time.monotonic()
    request = f"GET /healthz HTTP/1.1\r\nHost: t\r\n{headers}\r\n".encode()
    with socket.create_connection(("127.0.0.1", port_of(url)), timeout=5) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused mid-way: fine
            sock.sendall(request)
        response = read_response(sock)
    status = status_of(response)
    assert status is None or status in (400, 413, 431), response[:300]  # never a 200 or a 5xx
    assert time.monotonic() - t0 < 10
    assert_responsive(url)


def test_many_small_headers_under_the_limit_are_served(server) -> None:  # type: ignore[no-untyped-def]
    url, _ = server
    headers = {f"x-h{i}": "v" for i in range(1000)}  # ~10 KiB: legitimate, if odd
    assert httpx.get(f"{url}/healthz", headers=headers, timeout=5).status_code == 200
