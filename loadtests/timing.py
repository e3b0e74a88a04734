"""Helpers the benchmark scripts share: throughput of a blocking call, a server process on a free port (started
with its log in a file, ready when /readyz answers 200, stopped), naming a request's outcome."""

from __future__ import annotations

import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

SERVE_COMMAND = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1"]  # + ["--port", N]


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


def log_tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_ready(url: str, server: subprocess.Popen[Any], timeout: float, log: Path | None = None) -> None:
    """Returns once `url`/readyz answers 200; raises RuntimeError if the server exits first, TimeoutError after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited {server.returncode}: {log_tail(log) if log else ''}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"the server at {url} did not turn ready within {timeout:g} s")


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen[Any]
    log: Path
    keep_log: bool = False  # set it to keep (and show) the log after a clean exit, e.g. when requests failed


@contextmanager
def server_process(
    command: list[str], env: dict[str, str] | None, name: str, *, ready_timeout: float = 180
) -> Iterator[ServerProcess]:
    """`command` + `--port N` on a free port, until /readyz answers 200; stopped when the block ends. Its output
    goes to a log file, never to a pipe nobody reads: the service writes a line per request, and once a pipe's
    64 KiB are full (about 500 requests) that write blocks its event loop and it stops answering. The log is
    deleted after a clean exit, and kept (its path and last lines printed) when the block raised or asked for
    it with `keep_log`."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix=f"clipserve-{name}-", suffix=".log")[1])
    with log.open("wb") as sink:
        process = subprocess.Popen([*command, "--port", str(port)], env=env, stdout=sink, stderr=subprocess.STDOUT)
    server = ServerProcess(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_ready(server.url, process, ready_timeout, log)
        yield server
    except BaseException:
        server.keep_log = True
        raise
    finally:
        stop_server(process, timeout=30)
        if server.keep_log:
            print(f"   {name} server log ({log}, kept):\n{log_tail(log)}", flush=True)
        else:
            log.unlink(missing_ok=True)


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
