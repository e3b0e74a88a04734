"""The graceful drain, end to end: the real `clipserve serve` process, real HTTP, a real SIGTERM.

The acceptance: every request gets an answer (200, or 503 with Retry-After in the error shape), none is cut
off with a reset or an empty reply; /readyz answers 503 during the drain; a classifier preparing in the
background neither blocks nor crashes the exit; the process exits 0 within CLIPSERVE_SHUTDOWN_GRACE_S.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.service.conftest import b64, free_port, shape_png

GRACE_S = 12.0  # listening window min(5, G/4) = 3 s; in-flight requests cut off at G - min(3, G/5) = 9.6 s


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def serve(tmp_path: Path, **env: str) -> Iterator[Server]:
    port = free_port()
    log = tmp_path / "server.log"
    environment = {
        **os.environ,
        "CLIPSERVE_SHUTDOWN_GRACE_S": str(GRACE_S),
        "CLIPSERVE_STATE_DIR": str(tmp_path / "state"),
        "CLIPSERVE_LOG_FORMAT": "text",
        **env,
    }
    command = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, env=environment, stdout=sink, stderr=subprocess.STDOUT)
    server = Server(process, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"the server exited at startup:\n{server.output()}"
            assert time.monotonic() < deadline, f"the server did not turn ready:\n{server.output()}"
            try:
                if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def terminate(server: Server) -> float:
    """SIGTERM; returns when it was sent (time.monotonic)."""
    server.process.send_signal(signal.SIGTERM)
    return time.monotonic()


def wait_exit(server: Server, since: float) -> tuple[int, float]:
    try:
        code = server.process.wait(timeout=GRACE_S + 10)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {GRACE_S + 10:g} s after SIGTERM:\n{server.output()}") from None
    return code, time.monotonic() - since


def assert_refused_in_shape(response: httpx.Response, code: str = "draining") -> None:
    assert response.status_code == 503, response.text
    assert response.headers.get("retry-after", "").isdigit(), response.headers
    error = response.json()["error"]
    assert {"code", "message", "param"} <= set(error) and error["code"] == code, error


def fresh_labels(count: int) -> list[str]:
    """Labels never sent before: their vectors are encoded for this request, so it takes a while."""
    return [f"thing {uuid.uuid4().hex[:8]}" for _ in range(count)]


IMAGE = b64(shape_png())


def test_sigterm_in_the_middle_of_a_burst_answers_every_request_and_exits_0(tmp_path):
    with serve(tmp_path) as server:
        outcomes: dict[int, httpx.Response | Exception] = {}
        sent = [threading.Event() for _ in range(32)]

        def classify(i: int) -> None:
            def trace(event: str, info: dict) -> None:
                if event == "http11.send_request_body.complete":
                    sent[i].set()

            body = {"images": [IMAGE], "labels": fresh_labels(2), "templates": "imagenet"}
            try:
                with httpx.Client(timeout=60) as client:  # a connection of its own
                    outcomes[i] = client.post(f"{server.url}/classify", json=body, extensions={"trace": trace})
            except Exception as error:  # a reset or an empty reply: what the drain must never do
                outcomes[i] = error
                sent[i].set()

        with httpx.Client(base_url=server.url, timeout=60) as keep_alive, ThreadPoolExecutor(32) as pool:
            assert keep_alive.get("/v1/models").status_code == 200  # its connection is now open and idle
            first = [pool.submit(classify, i) for i in range(16)]
            for event in sent[:16]:
                assert event.wait(30), "a request of the first half was never sent"
            # A round trip on a new connection: the server's loop has read and admitted what arrived before it.
            assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 200
            signalled = terminate(server)

            readyz = httpx.get(f"{server.url}/readyz", timeout=10)
            assert_refused_in_shape(readyz)
            assert readyz.headers["connection"] == "close"
            assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200  # alive: no restart
            # A new request on a keep-alive connection opened before the signal: a 503 and a clean close.
            again = keep_alive.post("/classify", json={"images": [IMAGE], "labels": ["a", "b"]})
            assert_refused_in_shape(again)
            assert again.headers["connection"] == "close"
            second = [pool.submit(classify, i) for i in range(16, 32)]
            for future in first + second:
                future.result()
        assert time.monotonic() - signalled < GRACE_S / 4, "the second half must have been sent in the window"
        code, elapsed = wait_exit(server, signalled)

    failures = {i: repr(o) for i, o in outcomes.items() if isinstance(o, Exception)}
    assert not failures, f"requests without an answer: {failures}\n{server.output()}"
    responses = {i: o for i, o in outcomes.items() if isinstance(o, httpx.Response)}
    assert len(responses) == 32
    for i in range(16):  # admitted before the signal: they finish
        assert responses[i].status_code == 200, (i, responses[i].text)
        assert len(responses[i].json()["results"][0]["labels"]) == 2
    for i in range(16, 32):  # after it: refused, retryable
        assert_refused_in_shape(responses[i])
    assert code == 0, server.output()
    assert elapsed <= GRACE_S, f"exited {elapsed:.1f} s after SIGTERM"
    output = server.output()
    assert "Traceback" not in output
    in_flight = re.search(r"draining (\d+) request\(s\) in flight", output)
    assert in_flight and int(in_flight[1]) > 0, f"the burst must have been in flight at SIGTERM:\n{output}"
    print(in_flight[0], f"; exited {elapsed:.1f} s after SIGTERM")


def test_a_classifier_preparing_in_the_background_neither_blocks_nor_crashes_the_exit(tmp_path):
    with serve(tmp_path) as server:
        labels = [f"label {i} {uuid.uuid4().hex[:6]}" for i in range(2000)]  # 160,000 prompts: minutes of work
        put = httpx.put(f"{server.url}/v1/classifiers/big", json={"labels": labels, "templates": "imagenet"})
        assert put.status_code == 202, put.text
        deadline = time.monotonic() + 60
        while httpx.get(f"{server.url}/v1/classifiers/big").json()["prompts_prepared"] == 0:
            assert time.monotonic() < deadline, "preparation never started"
            time.sleep(0.1)
        # With nothing in flight, the drain waits out the listening window and no more.
        signalled = terminate(server)
        status = httpx.get(f"{server.url}/v1/classifiers/big", timeout=10)
        assert_refused_in_shape(status)  # admission is closed for every route but the probes
        while True:  # the probes answer until the listening socket closes
            try:
                assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
            except httpx.ConnectError:
                break
            time.sleep(0.1)
        closed_after = time.monotonic() - signalled
        code, elapsed = wait_exit(server, signalled)

    assert code == 0, server.output()
    assert elapsed <= GRACE_S, f"exited {elapsed:.1f} s after SIGTERM"
    assert closed_after >= GRACE_S / 4, "the listening socket must stay open for its window"
    output = server.output()
    assert "Traceback" not in output and "ERROR" not in output, output
    assert "Application shutdown complete" in output


def test_a_request_still_running_at_the_end_of_the_grace_gets_a_503_and_the_exit_stays_on_time(tmp_path):
    # Listening 2.5 s; requests cut off at 8 s; 2 s left for the lifespan's shutdown, enough on a loaded machine.
    grace = 10.0
    with serve(tmp_path, CLIPSERVE_SHUTDOWN_GRACE_S=str(grace)) as server:
        # 72,000 prompts: about 14 s of text encoding on two cores, well past the cutoff.
        body = {"images": [IMAGE], "labels": fresh_labels(900), "templates": "imagenet"}
        outcome: list[httpx.Response | Exception] = []
        sent = threading.Event()

        def trace(event: str, info: dict) -> None:
            if event == "http11.send_request_body.complete":
                sent.set()

        def slow() -> None:
            try:
                with httpx.Client(timeout=60) as client:
                    outcome.append(client.post(f"{server.url}/classify", json=body, extensions={"trace": trace}))
            except Exception as error:
                outcome.append(error)

        thread = threading.Thread(target=slow)
        thread.start()
        assert sent.wait(30)
        assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 200  # admitted by now
        signalled = terminate(server)
        thread.join(timeout=30)
        code, elapsed = wait_exit(server, signalled)

    assert len(outcome) == 1 and isinstance(outcome[0], httpx.Response), (outcome, server.output())
    assert_refused_in_shape(outcome[0])
    assert "did not finish" in outcome[0].json()["error"]["message"]
    assert code == 0, server.output()
    assert elapsed <= grace, f"exited {elapsed:.1f} s after SIGTERM"
    assert "Traceback" not in server.output()
