"""Pure ASGI middleware: request metrics and the body-size limit (pure ASGI so cancellation and streaming pass
through untouched, which BaseHTTPMiddleware does not guarantee)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLarge, error_response
from service.metrics import Metrics


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_and_record(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            # The route template, not the raw path, keeps label cardinality bounded (404s share one label).
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.request_seconds.labels(route).observe(time.perf_counter() - start)


class BodyLimitMiddleware:
    """413 for bodies over the limit: at once from Content-Length, or while reading a chunked body.

    Then, like nginx's lingering close, the rest of the body is read and thrown away (up to `linger_bytes`
    and `linger_s`) before the connection closes. Clients that send the whole body before reading the answer
    (urllib, requests) otherwise get "connection reset" instead of the 413: the kernel answers data that
    arrives for, or is left unread in, a closed socket with a reset. This has to happen before the ASGI
    response is complete: from then on uvicorn's receive() returns http.disconnect at once without reading,
    and on a Connection: close response it closes the socket right away (httptools and h11 alike). So the
    413 goes out whole at once (clients that read while they send see it without waiting) and only its
    last, empty ASGI message waits for the discarding.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, linger_bytes: int, linger_s: float) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.linger_bytes, self.linger_s = linger_bytes, linger_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        linger_bytes, linger_s = self.linger_bytes, self.linger_s
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            # A client waiting for "100 Continue" has not sent the body, and one that will send more than the
            # bound gets a reset whatever we read first: for both, close at once rather than read for nothing.
            if declared > linger_bytes or _header(scope, b"expect").lower() == b"100-continue":
                linger_bytes = 0
            await _send_too_large(send, self._message(declared), lambda: discard_body(receive, linger_bytes, linger_s))
            return
        received, over, body_done = 0, False, False

        async def counting_receive() -> Message:
            nonlocal received, over, body_done
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    over = True
                    raise PayloadTooLarge(self._message(received))
            return message

        async def lingering_send(message: Message) -> None:
            # The app's answer to the PayloadTooLarge (errors.install makes it), or whatever it sends instead.
            if over and message["type"] == "http.response.start":
                message = {**message, "headers": _with_connection_close(message.get("headers", []))}
            elif over and message["type"] == "http.response.body" and not message.get("more_body", False):
                await send({**message, "more_body": True})
                if not body_done:  # a receive() after the last chunk would wait for the response to end
                    await discard_body(receive, linger_bytes, linger_s)
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app(scope, counting_receive, lingering_send)

    def _message(self, size: int) -> str:
        return f"request body of {size:,} bytes is over the {self.max_bytes:,}-byte limit"


def _header(scope: Scope, name: bytes) -> bytes:
    return next((value for key, value in scope.get("headers", []) if key == name), b"")


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _with_connection_close(headers: Iterable[Any]) -> list[tuple[bytes, bytes]]:
    # The unread rest of the body leaves the connection unusable for another request.
    kept = [(name, value) for name, value in headers if name.lower() != b"connection"]
    return [*kept, (b"connection", b"close")]


async def discard_body(receive: Receive, most_bytes: int, most_s: float) -> None:
    """Read and drop the rest of the body, up to `most_bytes` (give or take a message) and `most_s` seconds."""
    discarded = 0
    with anyio.move_on_after(most_s):
        while discarded < most_bytes:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect: the client is gone, nothing left to spare it
                return
            discarded += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


async def _send_too_large(send: Send, message: str, linger: Callable[[], Awaitable[None]]) -> None:
    # The one error response, sent by hand: its last (empty) message must wait for the discarding.
    response = error_response(PayloadTooLarge(message))
    headers = _with_connection_close(response.raw_headers)
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": response.body, "more_body": True})
    await linger()
    await send({"type": "http.response.body", "body": b"", "more_body": False})
