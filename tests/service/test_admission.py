"""The admission middleware and the drain's timeline, in process: a toy app whose requests wait on the test,
and the real app (its lifespan, the demo model) for /readyz, the metrics and the lifespan's part."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import httpx
import pytest
import uvicorn
from starlette.types import Message, Receive, Scope, Send

from service.admission import AdmissionMiddleware, Drain, DrainingServer
from tests.service.conftest import running_app, wait_until


class Toy:
    """An ASGI app whose requests are held until the test releases them; it records what it read."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = 0
        self.bodies: list[bytes] = []
        self.start_first = False  # send the response's start before waiting

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/healthz":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        self.entered += 1
        if self.start_first:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        await self.release.wait()
        if not self.start_first:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})


class ReadCounter:
    """Outermost layer: how many request-body messages each request had read from it."""

    def __init__(self, app: Callable) -> None:
        self.app, self.reads = app, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counting() -> Message:
            self.reads += 1
            return await receive()

        await self.app(scope, counting, send)


def client_for(app: Callable) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30)


def assert_refused(response: httpx.Response, code: str) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert {"code", "message", "param"} <= set(error) and error["code"] == code


def test_the_timeline_follows_the_grace():
    drain = Drain(20.0)
    assert (drain.listen_s, drain.reserve_s, drain.uvicorn_timeout_s) == (5.0, 3.0, 12)
    short = Drain(4.0)
    assert (short.listen_s, short.reserve_s, short.uvicorn_timeout_s) == (1.0, 0.8, 3)
    assert not drain.draining and not drain.listen_over() and drain.until_deadline_s() == 20.0
    assert drain.begin() and not drain.begin()  # once
    assert drain.draining and drain.until_cutoff_s() <= 17.0


async def test_past_the_cap_requests_get_503_with_retry_after_before_their_body_is_read():
    toy = Toy()
    admission = AdmissionMiddleware(toy, drain=Drain(20), max_concurrent=2)
    counter = ReadCounter(admission)
    async with client_for(counter) as client:
        held = [asyncio.create_task(client.post("/work", content=b"x" * 1000)) for _ in range(2)]
        await wait_until(lambda: toy.entered == 2, "two requests in flight")
        reads = counter.reads
        refused = await client.post("/work", content=b"y" * 1000)
        assert_refused(refused, "overloaded")
        assert counter.reads == reads, "the refused request's body must not be read"
        assert "connection" not in refused.headers  # keep-alive: the server discards the body itself
        assert (await client.get("/healthz")).status_code == 200  # the probes are never refused
        toy.release.set()
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
        assert admission.in_flight == 0
        assert (await client.post("/work", content=b"z")).status_code == 200  # recovered


async def test_while_draining_new_requests_get_503_and_every_answer_closes_its_connection():
    toy = Toy()
    drain = Drain(20)
    counter = ReadCounter(AdmissionMiddleware(toy, drain=drain, max_concurrent=8))
    async with client_for(counter) as client:
        held = asyncio.create_task(client.post("/work", content=b"admitted"))
        await wait_until(lambda: toy.entered == 1, "one request in flight")
        drain.begin()
        refused = await client.post("/work", content=b"a body that is read and dropped")
        assert_refused(refused, "draining")
        assert refused.headers["connection"] == "close"
        assert counter.reads >= 2, "a refused request's body is read before the connection closes"
        health = await client.get("/healthz")
        assert health.status_code == 200 and health.headers["connection"] == "close"
        toy.release.set()
        admitted = await held
        assert admitted.status_code == 200 and admitted.content == b"done"  # what was admitted finishes
        assert admitted.headers["connection"] == "close"
        assert toy.bodies == [b"admitted"]


async def test_the_cutoff_answers_what_is_still_running_with_503():
    toy = Toy()
    drain = Drain(20)
    admission = AdmissionMiddleware(toy, drain=drain, max_concurrent=8)
    async with client_for(admission) as client:
        held = asyncio.create_task(client.post("/work"))
        await wait_until(lambda: toy.entered == 1, "one request in flight")
        drain.begin()
        assert drain.in_flight == 1
        drain.cut_off()
        response = await held
        assert_refused(response, "draining")
        assert "did not finish" in response.json()["error"]["message"]
        assert admission.in_flight == 0 and drain.in_flight == 0


async def test_the_cutoff_after_the_response_started_sends_nothing_more():
    toy = Toy()
    toy.start_first = True
    drain = Drain(20)
    sent: list[Message] = []

    async def recording_send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/work", "headers": []}
    task = asyncio.create_task(AdmissionMiddleware(toy, drain=drain, max_concurrent=8)(scope, receive, recording_send))
    await wait_until(lambda: toy.entered == 1, "one request in flight")
    drain.begin()
    drain.cut_off()
    await task  # returns without raising; uvicorn closes the connection on the incomplete response
    assert [m["type"] for m in sent] == ["http.response.start"]


async def test_the_real_app_refuses_under_its_cap_and_counts_refusals_apart():
    async with running_app(max_concurrent_requests=1) as (app, client):
        admission = next(m for m in app.user_middleware if m.cls is AdmissionMiddleware)
        assert admission.kwargs["max_concurrent"] == 1
        ready = await client.get("/readyz")
        assert ready.status_code == 200

        app.state.drain.begin()
        draining = await client.get("/readyz")
        assert_refused(draining, "draining")
        assert draining.headers["connection"] == "close"
        assert (await client.get("/healthz")).status_code == 200
        refused = await client.post("/classify", json={"images": [], "labels": ["a"]})
        assert_refused(refused, "draining")
        metrics = app.state.metrics.value
        assert metrics("clipserve_requests_total", {"route": "refused", "status": "503"}) == 1
        assert metrics("clipserve_requests_total", {"route": "/readyz", "status": "503"}) == 1


async def test_the_lifespan_ending_starts_the_drain():
    async with running_app() as (app, _):
        assert not app.state.drain.draining
    assert app.state.drain.draining  # late requests of an embedding server get 503, not a stopped pipeline


async def test_sigterm_starts_the_drain_and_the_listening_window_ends_it():
    drain = Drain(20)  # listening 5 s
    server = DrainingServer(uvicorn.Config(Toy()), drain, watchdog=False)
    assert not await server.on_tick(1)
    server.handle_exit(signal.SIGTERM, None)
    assert drain.draining and not server.should_exit
    assert server._captured_signals == []  # not re-raised after the shutdown: the exit status stays 0
    assert not await server.on_tick(2)  # still listening
    assert drain.began is not None
    drain.began -= drain.listen_s  # as if the window had passed
    assert await server.on_tick(3)


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_or_sigint_stops_listening_at_once(second):
    drain = Drain(20)
    server = DrainingServer(uvicorn.Config(Toy()), drain, watchdog=False)
    server.handle_exit(signal.SIGTERM, None)
    server.handle_exit(second, None)
    assert server.should_exit
    assert server._captured_signals == ([] if second == signal.SIGTERM else [signal.SIGINT])
