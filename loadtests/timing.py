"""Helpers the benchmark scripts share: throughput of a blocking call, a free port, stopping a server process,
naming a request's outcome."""

from __future__ import annotations

import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any


def rate_per_second(call: Callable[[], Any], items: int, *, warmup: int, reps: int, seconds: float) -> float:
    """Median over `reps` windows of at least `seconds` each of items per second, calling `call` back to back."""
    for _ in range(warmup):
        call()
    rates = []
    for _ in range(reps):
        done, start = 0, time.perf_counter()
        while True:
            call()
            done += items
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        rates.append(done / elapsed)
    return statistics.median(rates)


def free_port() -> int:
    """A port nothing listens on now, for a server the script starts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_server(server: subprocess.Popen[Any], timeout: float) -> None:
    """SIGINT (uvicorn's graceful shutdown), then SIGKILL if it has not exited within `timeout` seconds."""
    server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def outcome_kind(outcome: Any) -> str:
    """What happened to one HTTP request, as a short key to count by: the status code of an answer ("200",
    "503"), or the class of the exception raised instead ("ReadError", "ConnectError", "RemoteProtocolError",
    "ReadTimeout", ...). Takes an httpx.Response or an exception (duck-typed: no httpx import here)."""
    status = getattr(outcome, "status_code", None)
    return str(status) if isinstance(status, int) else type(outcome).__name__
