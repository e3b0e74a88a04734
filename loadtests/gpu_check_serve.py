"""The GPU check's end-to-end measurement: `/classify` served by the torch engine and the CUDA kernel.

The service runs as users run it (`python -m service.cli serve`, settings from CLIPSERVE_* variables, the
built-in demo model, no Redis) in a child process, so the load generator here does not share its interpreter
lock. N clients each send one request after another (one small JPEG, ten labels, top 5) for a fixed time;
latency is measured per request at the client, and the server's own timing of the similarity step is kept.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image, ImageDraw

from loadtests.gpu_check_config import Config, Recorder, measure
from loadtests.gpu_check_setup import REPOSITORY
from loadtests.timing import free_port, stop_server

LABELS = [
    "red circle",
    "blue triangle",
    "green square",
    "yellow hexagon",
    "purple star",
    "orange circle",
    "white square",
    "black triangle",
    "a cat",
    "a dog",
]


def small_jpegs(count: int, size: tuple[int, int] = (320, 240)) -> list[bytes]:
    """Distinct photo-sized-down JPEGs (shapes on a noisy background), made with Pillow."""
    rng = np.random.default_rng(9)
    blobs = []
    for _ in range(count):
        background = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        image = Image.fromarray(background, "RGB").resize(size, Image.Resampling.BILINEAR)
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x, y = int(rng.integers(0, size[0])), int(rng.integers(0, size[1]))
            radius = int(rng.integers(15, 60))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        blobs.append(buffer.getvalue())
    return blobs


def server_environment(config: Config, similarity: str, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "CLIPSERVE_ENGINE": "torch",
        "CLIPSERVE_PRECISION": config.serve_precision,
        "CLIPSERVE_SIMILARITY": similarity,
        "CLIPSERVE_CUDA_KERNELS": str(config.fatbin),
        "CLIPSERVE_MAX_BATCH_SIZE": str(config.serve_max_batch),
        "CLIPSERVE_MAX_QUEUE": "4096",
        "CLIPSERVE_REQUEST_TIMEOUT_S": "60",
        "CLIPSERVE_PORT": str(port),
        "PYTHONUNBUFFERED": "1",
    }


@contextmanager
def running_server(environment: dict[str, str], log: Path, timeout: float = 180) -> Iterator[tuple[str, dict]]:
    """The service in a child process until ready (/readyz 200); yields its URL and the /readyz answer."""
    port = environment["CLIPSERVE_PORT"]
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", port],
            cwd=REPOSITORY,
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            yield url, _wait_ready(url, server, log, timeout)
        finally:
            stop_server(server, timeout=20)


def _wait_ready(url: str, server: subprocess.Popen, log: Path, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited ({server.returncode}): {log_tail(log)}")
        try:
            response = httpx.get(f"{url}/readyz", timeout=2, trust_env=False)
            if response.status_code == 200:
                return response.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"the server was not ready after {timeout:.0f} s: {log_tail(log)}")


def log_tail(log: Path, lines: int = 25) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def drive(url: str, bodies: list[dict], concurrency: int, seconds: float) -> dict[str, Any]:
    """`concurrency` clients, each sending request after request for `seconds`; counts and latencies."""
    latencies: list[float] = []
    similarity_ms: list[float] = []
    errors: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits, trust_env=False) as client:
        stop_at = time.perf_counter() + seconds

        async def client_loop(offset: int) -> None:
            sent = offset
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                try:
                    response = await client.post("/classify", json=bodies[sent % len(bodies)])
                except httpx.HTTPError as error:
                    errors[type(error).__name__] += 1
                    continue
                finally:
                    sent += 1
                if response.status_code == 200:
                    latencies.append((time.perf_counter() - start) * 1000)
                    with contextlib.suppress(KeyError, TypeError, ValueError):  # the server's timing is a bonus
                        similarity_ms.append(float(response.json()["timing"]["similarity_ms"]))
                else:
                    errors[f"HTTP {response.status_code}"] += 1

        cpu, start = time.process_time(), time.perf_counter()
        await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu

    def percentile(q: float) -> float | None:
        return float(np.percentile(latencies, q)) if latencies else None

    return {
        "concurrency": concurrency,
        "seconds": elapsed,
        "requests": len(latencies),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "requests_s": len(latencies) / elapsed,
        "p50_ms": percentile(50),
        "p95_ms": percentile(95),
        "p99_ms": percentile(99),
        "server_similarity_ms_median": statistics.median(similarity_ms) if similarity_ms else None,
        "client_cpu": cpu / elapsed,  # near 1.0: the load generator itself was the limit
    }


def serve_section(config: Config, recorder: Recorder) -> None:
    bodies = [
        {"images": [base64.b64encode(blob).decode()], "labels": LABELS, "templates": "simple", "top_k": 5}
        for blob in small_jpegs(8)
    ]
    recorder.set(
        "method",
        {
            "images": "8 distinct 320×240 JPEGs (q85), one per request",
            "labels": len(LABELS),
            "top_k": 5,
            "seconds": config.serve_seconds,
            "warmup_seconds": config.serve_warmup_seconds,
            "settings": {
                "CLIPSERVE_ENGINE": "torch",
                "CLIPSERVE_PRECISION": config.serve_precision,
                "CLIPSERVE_MAX_BATCH_SIZE": config.serve_max_batch,
                "model": "built-in demo",
                "redis": "none",
            },
        },
    )
    with tempfile.TemporaryDirectory() as directory:
        for similarity, levels in config.serve_runs:
            if similarity == "cuda" and config.device != "cuda":
                recorder.note("CLIPSERVE_SIMILARITY=cuda skipped: needs a CUDA GPU")
                continue
            log = Path(directory) / f"server-{similarity}.log"
            run: dict[str, Any] = {"similarity": similarity, "levels": []}
            recorder.row("runs", run)  # the same dict, flushed again after each level
            measure(run, "ok", partial(_serve_run, config, similarity, levels, log, run, bodies, recorder))
            if run.get("errors"):
                run["server_log_tail"] = log_tail(log)
            recorder.flush()


def _serve_run(
    config: Config,
    similarity: str,
    levels: tuple[int, ...],
    log: Path,
    run: dict[str, Any],
    bodies: list[dict],
    recorder: Recorder,
) -> bool:
    environment = server_environment(config, similarity, free_port())
    start = time.perf_counter()
    with running_server(environment, log) as (url, ready):
        run["startup_s"] = time.perf_counter() - start
        run["engine"] = ready.get("engine")
        print(f"    server ready in {run['startup_s']:.1f} s: {run['engine']}, similarity {similarity}", flush=True)
        # Label vectors cached and a CUDA graph captured for every batch size the load will produce.
        asyncio.run(drive(url, bodies, 1, min(0.5, config.serve_warmup_seconds)))
        asyncio.run(drive(url, bodies, max(levels), config.serve_warmup_seconds))
        for concurrency in levels:
            result = asyncio.run(drive(url, bodies, concurrency, config.serve_seconds))
            run["levels"].append(result)
            recorder.flush()
            print(
                f"    /classify similarity={similarity} concurrency {concurrency}: "
                f"{result['requests_s']:.0f} req/s, p50 {result['p50_ms'] or float('nan'):.1f} ms, "
                f"p99 {result['p99_ms'] or float('nan'):.1f} ms, {result['errors']} errors",
                flush=True,
            )
    return True
