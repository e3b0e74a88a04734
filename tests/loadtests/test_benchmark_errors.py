"""The benchmark's load generator counts every request's outcome by kind and reports it, instead of dying on the
first connection error; its exit status says whether any request failed; the server's log never fills a pipe."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from loadtests import benchmark, timing
from loadtests.benchmark import LoadResult, drive, markdown
from loadtests.timing import outcome_kind

OK = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{"results": []}'
BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
    b'content-length: 24\r\n\r\n{"error": {"code": "x"}}'
)


async def faulty_server() -> tuple[asyncio.Server, str]:
    """A raw HTTP/1.1 server whose answers rotate: 200, 503, a reset (RST, no answer) after reading the request,
    a close before answering (FIN), and silence (the client times out)."""
    served = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                ),
                0,
            )
            await reader.readexactly(length)
            served += 1
            kind = served % 5
            if kind in (0, 1):
                writer.write(OK if kind == 0 else BUSY)
                await writer.drain()
                continue
            if kind == 2:  # SO_LINGER 0: close() sends a RST, as a server that resets under load does
                writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            elif kind == 3:
                writer.close()
            else:  # no answer: the client times out and closes
                with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                    await reader.read()
                writer.close()
            return
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def test_drive_counts_every_outcome_by_kind_and_never_raises():
    async def scenario() -> LoadResult:
        server, url = await faulty_server()
        async with server:
            return await drive(url, {"images": ["x"], "labels": ["a"]}, concurrency=4, seconds=1.0, timeout=0.3)

    result = asyncio.run(scenario())
    kinds = set(result.outcomes)
    assert {"200", "503"} <= kinds, result.outcomes
    assert kinds & {"ReadError", "RemoteProtocolError"}, result.outcomes  # the reset and the early close
    assert "ReadTimeout" in kinds, result.outcomes
    assert result.requests == result.outcomes["200"] == len(result.latencies_ms) > 0
    assert result.errors == sum(result.outcomes.values()) - result.outcomes["200"] > 0
    assert "200" not in result.error_kinds() and "503" in result.error_kinds()


def args(tmp_path: Path, **extra: object) -> argparse.Namespace:
    return argparse.Namespace(max_batch=32, seconds=10.0, report=tmp_path / "BENCHMARK.md", **extra)


def canned(outcomes: dict[str, int]) -> dict:
    result = LoadResult(32, outcomes.get("200", 0), 10.0, [20.0] * outcomes.get("200", 0), outcomes)
    return {"model": "clipserve-demo", "engine": {1: 1000.0, 32: 2000.0}, "results": [result]}


def test_the_report_names_each_error_kind(tmp_path):
    failing = markdown([canned({"200": 90, "ReadError": 3, "503": 7})], args(tmp_path))
    assert "| 90 | 503 7, ReadError 3 |" in failing
    assert "**10 request(s) failed.**" in failing
    clean = markdown([canned({"200": 100})], args(tmp_path))
    assert "| 100 | - |" in clean and "Every request was answered 200." in clean


@pytest.mark.parametrize(("outcomes", "status"), [({"200": 5}, 0), ({"200": 5, "RemoteProtocolError": 1}, 1)])
def test_the_exit_status_says_whether_any_request_failed(tmp_path, monkeypatch, capsys, outcomes, status):
    monkeypatch.setattr(benchmark, "benchmark_model", lambda *_: canned(outcomes))
    assert benchmark.main(["--report", str(tmp_path / "b.md")]) == status
    out = capsys.readouterr().out
    assert ("1 request(s) failed: RemoteProtocolError 1" in out) == bool(status)
    assert (tmp_path / "b.md").exists()


def test_the_server_log_goes_to_a_file_not_a_pipe(tmp_path, monkeypatch):
    """A pipe nobody reads fills after about 500 access-log lines and then blocks the server's event loop."""
    seen: dict = {}

    class Exited:  # a server that exits at once: server_process gives up waiting for /readyz
        returncode = 1

        def __init__(self, command: list[str], **kwargs: object) -> None:
            seen.update(kwargs, log=Path(kwargs["stdout"].name))  # type: ignore[attr-defined]

        def poll(self) -> int:
            return 1

        def send_signal(self, signal: int) -> None: ...

        def wait(self, timeout: float | None = None) -> int:
            return 1

    monkeypatch.setattr(subprocess, "Popen", Exited)
    with pytest.raises(RuntimeError, match="server exited 1"), timing.server_process(timing.SERVE_COMMAND, {}, "test"):
        pass
    assert seen["stdout"] is not subprocess.PIPE and seen["stdout"].name.endswith(".log")
    assert seen["stderr"] is subprocess.STDOUT
    assert seen["log"].exists()  # kept, for a look at why it failed
    seen["log"].unlink()


def test_outcome_kind():
    import httpx

    assert outcome_kind(httpx.Response(503)) == "503"
    assert outcome_kind(httpx.ReadError("reset")) == "ReadError"
    assert outcome_kind(httpx.ReadTimeout("slow")) == "ReadTimeout"
