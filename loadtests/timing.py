"""Timing helpers the benchmark scripts share: throughput of a blocking call, stopping a server process."""

from __future__ import annotations

import signal
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


def stop_server(server: subprocess.Popen[Any], timeout: float) -> None:
    """SIGINT (uvicorn's graceful shutdown), then SIGKILL if it has not exited within `timeout` seconds."""
    server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
