"""Request ids and the one access-log line per request.

`RequestLogMiddleware` is the outermost layer: it takes the client's `X-Request-ID` when it is sane (else makes
one), binds it to the request's task (service.request_context, which error bodies read), echoes it on every
response with a `Server-Timing` header (the stages the request's work noted, and `app`: its whole time in the
application until the answer began), and logs each request once, when it ends, with its route, status, duration
and the engine batch sizes it rode in.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ServiceError, error_response
from service.request_context import ServedRequest, bind

log = logging.getLogger("clipserve.access")
errors_log = logging.getLogger("clipserve.errors")

HEADER = "X-Request-ID"
_OWN_HEADERS = (b"x-request-id", b"server-timing")
# Ids go into log lines and response headers: a bounded, printable alphabet keeps both safe to echo.
_SANE_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def _client_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _SANE_ID.fullmatch(text) else None
    return None


def server_timing(stage_ms: dict[str, float], app_ms: float) -> str:
    """`parse;dur=0.412, ..., app;dur=9.87` (W3C Server-Timing): browsers' developer tools draw it, and the
    benchmark's per-request breakdown reads it."""
    return ", ".join(f"{stage};dur={ms:.3f}" for stage, ms in [*stage_ms.items(), ("app", app_ms)])


class RequestLogMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = ServedRequest(_client_id(scope) or uuid.uuid4().hex)
        token = bind(request)
        started = time.perf_counter()
        status = 0  # stays 0 when the client left before any answer

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in _OWN_HEADERS]
                timing = server_timing(request.stage_ms, (time.perf_counter() - started) * 1000)
                own = [(b"x-request-id", request.id.encode()), (b"server-timing", timing.encode())]
                message = {**message, "headers": [*headers, *own]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Handled here rather than by Starlette's outermost ServerErrorMiddleware, which runs outside this
            # layer: the 500 then carries the request id in its body, its header and the log line too.
            errors_log.exception(
                "unhandled error on %s %s (request %s)", scope.get("method"), scope.get("path"), request.id
            )
            if status:
                raise  # the answer has begun: all that is left is to drop the connection
            response = error_response(ServiceError("internal error; see the server log"))
            await response(scope, receive, send_with_id)
        finally:
            token.var.reset(token)
            duration_ms = (time.perf_counter() - started) * 1000
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            batch = " ".join(f"{name}={rows}" for name, rows in sorted(request.batch_sizes.items())) or "-"
            # The path's template, not the path itself, and never headers or query: nothing a client sent as a
            # secret (API keys travel in headers) can reach the log through this line.
            log.info(
                "%s %s %d %.1f ms batch %s id %s",
                scope.get("method", "?"),
                route,
                status,
                duration_ms,
                batch,
                request.id,
                extra={
                    "request_id": request.id,
                    "method": scope.get("method"),
                    "route": route,
                    "status": status,
                    "duration_ms": round(duration_ms, 2),
                    "batch_sizes": dict(request.batch_sizes),
                },
            )
