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
    """Status line, headers and (by Content-Length) the body, or what arrived before a close/timeout."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data) < response_length(data):
            part = sock.recv(65536)
            if not part:
                break
            data += part
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def response_length(data: bytes) -> int:
    head, _, _ = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(head) + 4 + int(value)
    return len(head) + 4


def status_of(response: bytes) -> int | None:
    if not response.startswith(b"HTTP/1.1 "):
        return None
    return int(response.split(b" ", 2)[1])


def assert_responsive(url: str) -> None:
    assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    r = httpx.post(f"{url}/generate", json={"prompt": "still here", "max_new_tokens": 2}, timeout=30)
    assert r.status_code == 200, r.text


def push_endless_chunked(url: str, path: str, content_type: str, first: bytes = b"") -> tuple[bytes, int]:
    """Send a chunked body until the server answers or stops reading; (its response, bytes sent).

    `first`: a small frame sent on its own, then up to 1 s for an answer, so the server's first read of
    the body gets exactly those bytes (what happens by chance when it reads faster than we send)."""
    chunk = b"x" * 65536
    frame = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    method = "PUT" if path.startswith("/tasks") else "POST"
    head = f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\n"
    head += "Transfer-Encoding: chunked\r\n\r\n"
    sent = 0
    with socket.create_connection(("127.0.0.1", port_of(url)), timeout=5) as sock:
        sock.sendall(head.encode())
        if first:
            sock.sendall(b"%x\r\n" % len(first) + first + b"\r\n")
            sent += len(first)
            select.select([sock], [], [], 1.0)
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
        return read_response(sock), sent


@pytest.mark.parametrize(
    ("path", "content_type"),
    [("/generate", "application/json"), ("/tasks/big", "multipart/form-data; boundary=xyz")],
)
def test_endless_chunked_body_is_413_and_not_read_past_the_limit(  # type: ignore[no-untyped-def]
    server, path: str, content_type: str
) -> None:
    url, _ = server
    response, sent = push_endless_chunked(url, path, content_type)
    assert status_of(response) == 413, response[:300]
    assert b"body_too_large" in response or b"413" in response
    assert sent < BUFFERS_BOUND, f"the server kept reading: {sent} bytes sent"
    assert_responsive(url)


@pytest.mark.parametrize(
    ("path", "content_type"),
    [("/generate", "application/json"), ("/tasks/big", "multipart/form-data; boundary=xyz")],
)
def test_chunked_body_over_the_limit_is_413_whatever_its_first_bytes(  # type: ignore[no-untyped-def]
    server, path: str, content_type: str
) -> None:
    """The cause of the old one-in-three 400: when the handler's first read got a few bytes, the
    multipart parser refused them (400) before the limit tripped. A chunked body is now read up to the
    limit before any parser sees it, so the answer does not depend on how fast the bytes arrive."""
    url, _ = server
    response, sent = push_endless_chunked(url, path, content_type, first=b"not a multipart body")
    assert status_of(response) == 413, response[:300]
    assert b"body_too_large" in response
    assert sent < BUFFERS_BOUND, f"the server kept reading: {sent} bytes sent"
    assert_responsive(url)


def test_chunked_body_under_the_limit_is_parsed_as_before(server) -> None:  # type: ignore[no-untyped-def]
    url, _ = server

    def chunks():  # httpx sends a generator body chunked, without Content-Length
        yield b'{"prompt": "chunked '
        yield b'but small", "max_new_tokens": 2}'

    r = httpx.post(f"{url}/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.request.headers.get("transfer-encoding") == "chunked"
    bad = httpx.put(
        f"{url}/tasks/small",
        content=iter([b"--xyz", b"!garbage"]),
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    )
    assert bad.status_code == 400, bad.text  # a malformed body under the limit is still the parser's 400


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
