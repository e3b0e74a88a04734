"""Fixtures for the service tests: the app with its lifespan (ASGI), a real uvicorn server, a real Redis."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import pytest
import pytest_asyncio
import uvicorn
from PIL import Image, ImageDraw

from service.app import create_app
from service.settings import Settings
from tests.service.redis_server import RedisServer


def _own_state_dir(overrides: dict[str, object]) -> dict[str, object]:
    """Saved classifiers of one test never meet another's (nor the user's ~/.local/state/clipserve)."""
    return {"state_dir": tempfile.mkdtemp(prefix="clipserve-state-")} | overrides


@asynccontextmanager
async def running_app(**overrides: object) -> AsyncIterator[tuple[object, httpx.AsyncClient]]:
    """The app with its lifespan run, and an in-process httpx client (ASGI, no sockets)."""
    app = create_app(Settings(**_own_state_dir(overrides)))  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://clipserve", timeout=60) as client:
            yield app, client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def live_server(*, http: str = "auto", **overrides: object) -> Iterator[tuple[object, str]]:
    """A real uvicorn server on a free port in a thread: real HTTP, real connection handling (`http`: uvicorn's
    HTTP implementation, httptools or h11)."""
    port = free_port()
    app = create_app(Settings(port=port, **_own_state_dir(overrides)))  # type: ignore[arg-type]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", http=http)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield app, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
async def demo():
    """A demo app of the test's own: for tests that change it or read its counters as absolute values."""
    async with running_app() as (app, client):
        yield app, client


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_demo():
    """One demo app for a whole module, for tests that only read it (no settings, keys or absolute counters).

    Its tests must run in the module's event loop: `pytest.mark.asyncio(loop_scope="module")`.
    """
    async with running_app() as (app, client):
        yield app, client


def engine_calls(app: Any, engine: str = "text") -> int:
    """Engine calls the app's `engine` batcher has made so far, as its metrics count them."""
    return int(app.state.metrics.value("clipserve_batch_size_count", {"engine": engine}))


async def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    """Poll until `condition()` holds. The bound only turns a hang into a failure; it never paces the test."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting after {timeout_s:g} s: {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def shape_png(shape: str = "triangle", colour: str = "blue", size: tuple[int, int] = (200, 150)) -> bytes:
    image = Image.new("RGB", size, "lightgrey")
    draw = ImageDraw.Draw(image)
    box = (size[0] // 2, size[1] // 2, min(size) // 3)
    sides = {"triangle": 3, "square": 4, "hexagon": 6}
    if shape == "circle":
        x, y, r = box
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    else:
        draw.regular_polygon(box, sides[shape], fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def gather_limited(coroutines: list, limit: int = 64) -> list:
    semaphore = asyncio.Semaphore(limit)

    async def one(coroutine):
        async with semaphore:
            return await coroutine

    return await asyncio.gather(*(one(c) for c in coroutines))
