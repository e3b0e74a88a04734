"""Admission control: the graceful drain on SIGTERM and the cap on requests served at once.

The drain, from SIGTERM at t=0, with G = CLIPSERVE_SHUTDOWN_GRACE_S:

* t=0: /readyz answers 503 (`draining`); every new request gets 503 `draining` with Retry-After; requests
  already admitted go on. Every response started from now on carries `Connection: close`, so a client's
  keep-alive connection ends right after an answer it has read, and its next request opens a new connection
  (to another replica, once the load balancer has taken this one out) instead of racing the close of an idle
  one.
* t=0 .. LISTEN (min(5 s, G/4)): the listening socket stays open. A load balancer only stops sending once it
  has seen /readyz fail (or its endpoint list has caught up), which takes a probe period or two; requests it
  sends meanwhile get a clean, retryable 503 instead of a refused connection. Bounded, so that a replica that
  nobody routes to still exits promptly; Kubernetes' preStop sleep covers the rest of the propagation delay.
* t=LISTEN: uvicorn's own shutdown: the listening socket closes, idle keep-alive connections are closed, and
  it waits for the admitted requests.
* t=G - RESERVE (RESERVE = min(3 s, G/5)): admitted requests still running are cut off with a 503 `draining`
  (rather than the connection reset a cancelled task gets), so that the lifespan's shutdown (saved-classifier
  preparation cancelled, batchers and engines stopped) has RESERVE seconds of its own.
* t=G: if the process is still alive, a watchdog ends it (exit status 1, logged): the grace is a promise to
  the orchestrator, whose SIGKILL would otherwise come without a word in the log.

SIGTERM alone is graceful and exits 0 (uvicorn would re-raise the signal after its shutdown, exiting 143); a
second SIGTERM ends the listening window at once. SIGINT keeps uvicorn's behaviour (Ctrl+C in a terminal
should not wait seconds), apart from answering 503 to what arrives while it shuts down.

The concurrency cap: past CLIPSERVE_MAX_CONCURRENT_REQUESTS requests in flight, a new one gets 503
`overloaded` with Retry-After before its body is read, so a refused request costs the server a header parse
and a small answer, not memory for its body, a decode and a place in the batcher's queue. The probes (/healthz, /readyz,
/metrics) are never refused: an overloaded replica is alive and must say so.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import Overloaded, ServiceError, error_response
from service.middleware import discard_body

log = logging.getLogger("clipserve")

EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_MAX_LISTEN_S = 5.0
_MAX_RESERVE_S = 3.0
# A refused request's body is read and dropped before the connection closes, or the kernel could answer the
# rest of it with a reset that destroys the 503 before the client reads it; bounded, as a slow sender must not
# hold the drain up.
_DISCARD_S = 1.0
_DISCARD_BYTES = 32 << 20


class _Refused:
    path = "refused"


_REFUSED = _Refused()


class Draining(ServiceError):
    status, code = 503, "draining"

    def __init__(self, message: str = "the server is shutting down; retry on another replica") -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class Drain:
    """The drain's timeline and the deadlines of the requests in flight. `begin` may run in a signal handler:
    it only records the time; the loop-side work (the cutoff, the watchdog) is `DrainingServer`'s."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.listen_s = min(_MAX_LISTEN_S, grace_s / 4)
        self.reserve_s = min(_MAX_RESERVE_S, grace_s / 5)
        self.began: float | None = None
        self._deadlines: set[asyncio.Timeout] = set()

    @property
    def draining(self) -> bool:
        return self.began is not None

    def begin(self) -> bool:
        """Starts the drain; False when it had already started."""
        if self.began is not None:
            return False
        self.began = time.monotonic()
        return True

    def elapsed_s(self) -> float:
        return 0.0 if self.began is None else time.monotonic() - self.began

    def listen_over(self) -> bool:
        return self.draining and self.elapsed_s() >= self.listen_s

    def until_cutoff_s(self) -> float:
        return max(0.0, self.grace_s - self.reserve_s - self.elapsed_s())

    def until_deadline_s(self) -> float:
        return max(0.0, self.grace_s - self.elapsed_s())

    @property
    def uvicorn_timeout_s(self) -> int:
        # uvicorn's wait for connections starts once the listening window is over; in whole seconds (its type),
        # rounded up so that the cutoff, which answers, always comes before uvicorn's, which cancels.
        return max(1, math.ceil(self.grace_s - self.listen_s - self.reserve_s))

    @property
    def in_flight(self) -> int:
        return len(self._deadlines)

    @asynccontextmanager
    async def bounded(self) -> AsyncIterator[asyncio.Timeout]:
        """The request's deadline for the drain: none until `cut_off` moves it to now."""
        async with asyncio.timeout(None) as deadline:
            self._deadlines.add(deadline)
            try:
                yield deadline
            finally:
                self._deadlines.discard(deadline)

    def cut_off(self) -> None:
        now = asyncio.get_running_loop().time()
        for deadline in list(self._deadlines):
            if not deadline.expired():
                deadline.reschedule(now)


class AdmissionMiddleware:
    """503 for new requests while draining or past `max_concurrent` in flight; `Connection: close` on every
    response started while draining. Pure ASGI (see service/middleware.py)."""

    def __init__(
        self,
        app: ASGIApp,
        drain: Drain,
        max_concurrent: int,
        exempt: Collection[str] = EXEMPT_PATHS,
    ) -> None:
        self.app, self.drain, self.max_concurrent = app, drain, max_concurrent
        self.exempt = exempt
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = self._closing_when_draining(send)
        if scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            await _discard_body(scope, receive)
            await self._refuse(scope, receive, send, Draining())
            return
        if self.in_flight >= self.max_concurrent:
            overloaded = Overloaded(f"{self.max_concurrent} requests already in flight; retry shortly")
            await self._refuse(scope, receive, send, overloaded)
            return
        started = False

        async def send_and_track(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        self.in_flight += 1
        try:
            async with self.drain.bounded() as deadline:
                await self.app(scope, receive, send_and_track)
        except TimeoutError:
            if not deadline.expired():
                raise  # the app's own, not the drain's cutoff
            log.warning(
                "%s %s cut off by the drain after %.1f s", scope["method"], scope["path"], self.drain.elapsed_s()
            )
            if not started:  # else uvicorn closes the connection on the incomplete response
                message = "the server is shutting down and this request did not finish within its grace; retry"
                await self._refuse(scope, receive, send, Draining(message))
        finally:
            self.in_flight -= 1

    def _closing_when_draining(self, send: Send) -> Send:
        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and self.drain.draining:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        return closing_send

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, error: ServiceError) -> None:
        # The router never sees a refused request: a route label of its own keeps these 503s apart from the 404s
        # ("unmatched") in the request metrics and the access log, and bounded (unlike the raw path).
        scope.setdefault("route", _REFUSED)
        await error_response(error)(scope, receive, send)


async def _discard_body(scope: Scope, receive: Receive) -> None:
    headers = dict(scope.get("headers", []))
    if headers.get(b"content-length", b"0") == b"0" and b"transfer-encoding" not in headers:
        return  # nothing to read: receive() would only wait for a disconnect
    await discard_body(receive, _DISCARD_BYTES, _DISCARD_S)


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain: SIGTERM starts it, and the main loop keeps the listening socket open
    until the window is over."""

    def __init__(self, config: uvicorn.Config, drain: Drain, *, watchdog: bool = True) -> None:
        super().__init__(config)
        self.drain = drain
        self.watchdog: threading.Timer | None = None
        self._use_watchdog = watchdog  # off where the server is not the whole process (a test's thread)
        self._timeline_started = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM:
            if not self.drain.begin():
                self.should_exit = True  # a second SIGTERM: close the listening socket now
            # Never recorded in `_captured_signals`: uvicorn would re-raise it after shutting down (exit 143).
            return
        self.drain.begin()
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if not self.drain.draining:
            return False
        if not self._timeline_started:  # here, not in the signal handler: no locks or threads in there
            self._timeline_started = True
            asyncio.get_running_loop().call_later(self.drain.until_cutoff_s(), self.drain.cut_off)
            if self._use_watchdog:
                self.watchdog = threading.Timer(self.drain.until_deadline_s(), self._overdue)
                self.watchdog.daemon = True
                self.watchdog.start()
            log.info(
                "SIGTERM: draining %d request(s) in flight; /readyz and new requests get 503; listening %.1f s "
                "more, exiting within %.1f s",
                self.drain.in_flight,
                max(0.0, self.drain.listen_s - self.drain.elapsed_s()),
                self.drain.until_deadline_s(),
            )
        return self.drain.listen_over()

    def _overdue(self) -> None:
        log.error("shutdown did not finish within CLIPSERVE_SHUTDOWN_GRACE_S=%g s; exiting now", self.drain.grace_s)
        logging.shutdown()
        os._exit(1)
