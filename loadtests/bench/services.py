"""The HTTP half of `make bench`: /classify on clipserve and on the transformers baseline, driven the same way.

Each service is started as a user would start it (a subprocess on a free port, its log in a file), and driven by
`loadtests.benchmark.drive` (N clients, each sending its next request when the last is answered). Everything is
one 640x480 JPEG per request and one template ("a photo of a {}."), at 10 and at 1,000 labels whose vectors are
warm (asked for once before the timed requests). For clipserve there is also the per-request breakdown, read
from the `Server-Timing` header the service writes for every request, and the label cache cold against warm.
"""

from __future__ import annotations

import asyncio
import base64
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtests.benchmark import LoadResult, drive, photo_jpeg, server_env
from loadtests.timing import SERVE_COMMAND, server_process

TEMPLATE = "a photo of a {}."
LABEL_COUNTS = (10, 1000)
MAX_BATCH = 32  # CLIPSERVE_MAX_BATCH_SIZE, and the raw engines' largest batch


def labels(count: int, prefix: str = "object") -> list[str]:
    """`count` distinct labels; a fresh `prefix` gives labels no cache has seen."""
    return [f"{prefix} number {i}" for i in range(count)]


def classify_body(count: int, prefix: str = "object") -> dict[str, Any]:
    image = base64.b64encode(photo_jpeg()).decode()
    return {"images": [image], "labels": labels(count, prefix), "templates": [TEMPLATE]}


@dataclass
class Level:
    """One load level: a service, a label count, a concurrency."""

    service: str
    labels: int
    concurrency: int
    result: LoadResult | None  # None: not run (see `note`)
    note: str = ""

    def row(self) -> dict[str, Any]:
        r = self.result
        return {
            "service": self.service,
            "labels": self.labels,
            "concurrency": self.concurrency,
            "requests_per_s": r.rps if r else None,
            "p50_ms": r.percentile(50) if r else None,
            "p99_ms": r.percentile(99) if r else None,
            "ok": r.requests if r else 0,
            "errors": r.error_kinds() if r else "-",
            "note": self.note,
        }


@dataclass
class Breakdown:
    """Medians over sequential requests (concurrency 1) of the client's latency and each Server-Timing stage."""

    labels: int
    requests: int
    client_ms: float
    stages_ms: dict[str, float] = field(default_factory=dict)  # stage -> median ms, in the server's order


@contextmanager
def clipserve(repository: Path, model: str, **env: str) -> Iterator[str]:
    """`clipserve serve` for `model`, with CLIPSERVE_* overrides in `env` (an engine, a precision)."""
    # A first request for 1,000 new labels encodes them all: about 100 s for ViT-B-32 on 2 cores, too close to
    # the benchmark's usual 120 s deadline.
    settings = {"CLIPSERVE_REQUEST_TIMEOUT_S": "900", **env}
    with server_process(
        SERVE_COMMAND, server_env(repository, model, MAX_BATCH, **settings), model, ready_timeout=600
    ) as s:
        yield s.url


@contextmanager
def transformers_app() -> Iterator[str]:
    command = [sys.executable, "-m", "loadtests.bench.transformers_app", "--host", "127.0.0.1"]
    with server_process(command, None, "transformers", ready_timeout=600) as server:
        yield server.url


def warm(client: httpx.Client, body: dict[str, Any]) -> float:
    """Sends `body` once (label vectors computed and cached); returns its latency in ms. One client for every
    call: making an httpx client costs tens of milliseconds (its SSL context), which would be timed too."""
    start = time.perf_counter()
    client.post("/classify", json=body).raise_for_status()
    return (time.perf_counter() - start) * 1000


def client(url: str, timeout: float = 900) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=timeout)


def load_levels(
    url: str,
    service: str,
    concurrencies: list[int],
    seconds: float,
    *,
    label_counts: tuple[int, ...] = LABEL_COUNTS,
    skip: dict[tuple[int, int], str] | None = None,
    timeout: float = 120,
    warm_first: bool = True,
) -> list[Level]:
    """Every (label count, concurrency) level against one running service, warm (one request per label count
    first, unless the caller sent it); `skip` names levels not run and why."""
    levels = []
    for count in label_counts:
        body = classify_body(count)
        if warm_first:
            with client(url) as once:
                first_ms = warm(once, body)
            print(f"   {service}: {count} labels, first request {first_ms:.0f} ms (vectors now cached)", flush=True)
        for concurrency in concurrencies:
            reason = (skip or {}).get((count, concurrency))
            if reason:
                levels.append(Level(service, count, concurrency, None, reason))
                print(f"   {service}: {count} labels, concurrency {concurrency}: not run ({reason})", flush=True)
                continue
            result = asyncio.run(drive(url, body, concurrency, seconds, timeout=timeout))
            levels.append(Level(service, count, concurrency, result))
            print(
                f"   {service}: {count} labels, concurrency {concurrency:>2}: {result.rps:7.2f} req/s, "
                f"p50 {result.percentile(50):8.1f} ms, p99 {result.percentile(99):8.1f} ms, "
                f"{result.requests} ok, errors: {result.error_kinds()}",
                flush=True,
            )
    return levels


def server_timing(header: str) -> dict[str, float]:
    """`parse;dur=0.4, app;dur=9.8` -> {"parse": 0.4, "app": 9.8}"""
    stages = {}
    for entry in filter(None, (part.strip() for part in header.split(","))):
        name, _, rest = entry.partition(";")
        for parameter in rest.split(";"):
            key, _, value = parameter.partition("=")
            if key.strip() == "dur":
                stages[name.strip()] = float(value)
    return stages


def breakdowns(url: str, counts: tuple[int, ...], rounds: int) -> list[Breakdown]:
    """Sequential warm requests, the label counts taking turns (so that a slower minute on a shared machine
    falls on all of them alike): per count, the client's latency and the server's stages, medians."""
    bodies = {count: classify_body(count) for count in counts}
    latencies: dict[int, list[float]] = {count: [] for count in counts}
    stages: dict[int, dict[str, list[float]]] = {count: {} for count in counts}
    with client(url) as session:
        for body in bodies.values():
            warm(session, body)
        for turn in range(rounds):
            for count in counts if turn % 2 == 0 else counts[::-1]:
                start = time.perf_counter()
                response = session.post("/classify", json=bodies[count])
                latencies[count].append((time.perf_counter() - start) * 1000)
                response.raise_for_status()
                for stage, ms in server_timing(response.headers.get("server-timing", "")).items():
                    stages[count].setdefault(stage, []).append(ms)
    return [
        Breakdown(
            count,
            rounds,
            statistics.median(latencies[count]),
            {stage: statistics.median(values) for stage, values in stages[count].items()},
        )
        for count in counts
    ]


@dataclass
class LabelCacheTiming:
    """1,000 labels the service has never seen: the first request, then the same labels in a new order (every
    vector cached, the set new), then the same request again (the set's matrix kept whole); ms at concurrency 1."""

    labels: int
    cold_ms: float
    vectors_warm_ms: float
    set_warm_ms: float
    prompts_per_s: float  # what the cold request's text encoding achieved


def label_cache_timing(url: str, count: int = 1000, repeats: int = 5) -> LabelCacheTiming:
    prefix = f"new {uuid.uuid4().hex[:8]}"  # never seen, even by a Redis that outlived an earlier run
    body = classify_body(count, prefix)
    reordered = {**body, "labels": body["labels"][::-1]}
    with client(url) as session:
        warm(session, classify_body(1))  # the connection is open before the timed requests
        cold = warm(session, body)
        vectors_warm = warm(session, reordered)
        set_warm = statistics.median(warm(session, body) for _ in range(repeats))
    return LabelCacheTiming(count, cold, vectors_warm, set_warm, count / (cold / 1000))
