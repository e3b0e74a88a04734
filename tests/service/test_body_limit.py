"""An oversized body gets a 413 that the client can read, on a real uvicorn (httptools and h11).

`requests` and `urllib` send the whole body before reading the answer: if the server closes while they are
still sending, they see "connection reset by peer" instead of the 413. The bodies here are paced (a pause
per chunk), as on any network slower than loopback, where kernel buffers cannot absorb the rest of the
body: without pacing a small test body fits in those buffers and hides the failure.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import requests

from tests.service.conftest import live_server

LIMIT_MB = 0.25
LIMIT = int(LIMIT_MB * 1024 * 1024)
LINGER_MB = 2.0
LINGER = int(LINGER_MB * 1024 * 1024)
LINGER_S = 1.5
CHUNK = 16 * 1024


@pytest.fixture(scope="module", params=["httptools", "h11"])
def base_url(request) -> Iterator[str]:
    limits = {"max_body_mb": LIMIT_MB, "body_linger_mb": LINGER_MB, "body_linger_s": LINGER_S}
    with live_server(http=request.param, **limits) as (_, url):
        yield url


def _json_body(size: int) -> bytes:
    head, tail = b'{"texts": ["', b'"]}'
    return head + b"a" * (size - len(head) - len(tail)) + tail


class _Paced:
    """A body handed out in chunks with a pause between them; `len()` gives clients a Content-Length."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[bytes]:
        for start in range(0, len(self.data), CHUNK):
            time.sleep(0.002)
            yield self.data[start : start + CHUNK]


def _post_requests(url: str, body: bytes, chunked: bool) -> tuple[int, dict[str, str], bytes]:
    headers = {"content-type": "application/json"}
    data = iter(_Paced(body)) if chunked else _Paced(body)  # a bare generator has no length: chunked
    response = requests.post(url, data=data, headers=headers, timeout=30)
    return response.status_code, {k.lower(): v for k, v in response.headers.items()}, response.content


def _post_urllib(url: str, body: bytes, chunked: bool) -> tuple[int, dict[str, str], bytes]:
    headers = {"content-type": "application/json"}
    if chunked:
        headers["transfer-encoding"] = "chunked"
    else:
        headers["content-length"] = str(len(body))
    request = urllib.request.Request(url, data=iter(_Paced(body)), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


def _still_serving(base_url: str) -> None:
    assert requests.get(f"{base_url}/healthz", timeout=10).status_code == 200


def _assert_too_large(status: int, headers: dict[str, str], content: bytes) -> None:
    assert status == 413, content[:200]
    assert headers.get("connection", "").lower() == "close"
    error = json.loads(content)["error"]
    assert error["code"] == "payload_too_large" and error["param"] is None
    assert isinstance(error["message"], str) and "limit" in error["message"]
    assert set(error) - {"request_id"} == {"code", "message", "param"}  # request_id: being added to the shape


@pytest.mark.parametrize("factor", [1.5, 3])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("client", ["requests", "urllib"])
def test_a_client_that_sends_the_whole_body_first_reads_the_413(base_url, client, framing, factor):
    post = _post_requests if client == "requests" else _post_urllib
    _assert_too_large(*post(f"{base_url}/embed", _json_body(int(LIMIT * factor)), framing == "chunked"))
    _still_serving(base_url)


def test_a_body_under_the_limit_is_still_served(base_url):
    status, _, content = _post_requests(f"{base_url}/embed", b'{"texts": ["a cat"]}', chunked=True)
    assert status == 200, content[:200]


def _connect(base_url: str) -> socket.socket:
    parts = urlsplit(base_url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)  # so "sent" is close to "the server took"
    return sock


def _head(framing: str, length: int, extra: str = "") -> bytes:
    size = f"content-length: {length}" if framing == "content-length" else "transfer-encoding: chunked"
    return f"POST /embed HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{size}\r\n{extra}\r\n".encode()


def _frame(data: bytes, framing: str) -> bytes:
    return data if framing == "content-length" else b"%x\r\n%s\r\n" % (len(data), data)


def _read_until_closed(sock: socket.socket) -> tuple[bytes, float | None]:
    """Everything the server sends until it closes, and when its first byte came (monotonic)."""
    received, first = b"", None
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return received, first
        if not data:
            return received, first
        first = first or time.monotonic()
        received += data


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_beyond_the_linger_bound_is_cut_off(base_url, framing):
    endless = 1 << 40
    sent, start = 0, time.monotonic()
    with _connect(base_url) as sock:
        sock.sendall(_head(framing, endless))
        block = _frame(b"a" * 256 * 1024, framing)
        with pytest.raises(OSError):  # reset or broken pipe: the server stopped reading and closed
            while time.monotonic() - start < 30:
                sock.sendall(block)
                sent += len(block)
    # What the server read, plus what kernel buffers on both sides took in; nowhere near "forever".
    assert sent < LIMIT + LINGER + 16 * 1024 * 1024, sent
    assert time.monotonic() - start < LINGER_S + 5
    _still_serving(base_url)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_client_that_stalls_mid_body_is_not_waited_on(base_url, framing):
    with _connect(base_url) as sock:
        sock.sendall(_head(framing, 3 * LIMIT) + _frame(b"a" * (LIMIT + CHUNK), framing))
        stalled_at = time.monotonic()
        response, first_byte_at = _read_until_closed(sock)
        closed_at = time.monotonic()
    assert response.startswith(b"HTTP/1.1 413 "), response[:200]
    assert b"payload_too_large" in response and b"connection: close" in response.lower()
    # The answer comes at once, for clients that read while they send; the close only when lingering ends.
    assert first_byte_at is not None and first_byte_at - stalled_at < LINGER_S / 2
    assert LINGER_S * 0.8 < closed_at - stalled_at < LINGER_S + 3
    _still_serving(base_url)


def test_a_client_that_expects_100_continue_gets_the_413_and_no_wait(base_url):
    with _connect(base_url) as sock:
        sock.sendall(_head("content-length", 3 * LIMIT, "expect: 100-continue\r\n"))
        asked_at = time.monotonic()
        response, _ = _read_until_closed(sock)
        closed_at = time.monotonic()
    assert response.startswith(b"HTTP/1.1 413 "), response[:200]
    assert b"100 Continue" not in response
    assert closed_at - asked_at < LINGER_S / 2  # it was never told to send the body: nothing to wait for
    _still_serving(base_url)
