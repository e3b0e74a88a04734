"""Benchmark: /classify throughput and latency at several concurrencies, beside the raw image engine's speed.

For each model it first times the image engine alone (ONNX Runtime, batch 1 and the service's max batch),
then starts the real service (uvicorn in a subprocess, the same command users run), warms the label cache,
and drives it with N concurrent clients, each sending one single-image request after another for a fixed
time. Every number in the report is measured in this one run on this machine, so ratios are meaningful even
when the machine is noisy.

Every request's outcome is counted by kind: its status code, or the exception the client got instead (ReadError,
RemoteProtocolError, ConnectError, ReadTimeout, ...). A failed request never stops the run; the counts are printed
per level and written to the report, and the exit status is 1 when any request failed (0 when all were 200s). The
server's log goes to a temporary file, deleted after a clean run, kept (path and tail printed) when requests failed.

    python -m loadtests.benchmark                                   # the built-in demo model
    python -m loadtests.benchmark --repository /tmp/repo --model vit-b-32-random --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from loadtests.timing import SERVE_COMMAND, outcome_kind, server_process
from models.demo import shapes
from models.demo.config import EXPORT_NAME, REPOSITORY_DIR
from models.manifest import load_manifest
from service.engines.onnxruntime import OnnxRuntimeEngine

LABELS = ["red circle", "blue triangle", "green square", "yellow hexagon", "purple star"] + [
    f"{c} {s}" for c in ("orange", "white", "black") for s in shapes.SHAPES
]

# The client closes a pooled connection after this many idle seconds, well under uvicorn's default keep-alive
# (5 s, which is also httpx's default expiry): a connection the server may be closing is never reused. The
# benchmark's connections are rarely idle at all; this keeps it so against any server it is pointed at.
CLIENT_KEEPALIVE_S = 2.0


@dataclass(frozen=True)
class LoadResult:
    concurrency: int
    requests: int  # answered 200
    seconds: float
    latencies_ms: list[float]  # of the 200s
    outcomes: dict[str, int] = field(default_factory=dict)  # every request by kind ("200", "503", "ReadError")

    @property
    def errors(self) -> int:
        return sum(count for kind, count in self.outcomes.items() if kind != "200")

    def error_kinds(self) -> str:
        """'ReadError 3, 503 1' (most frequent first), or '-' when every request was a 200."""
        errors = sorted(((n, k) for k, n in self.outcomes.items() if k != "200"), key=lambda e: (-e[0], e[1]))
        return ", ".join(f"{kind} {count}" for count, kind in errors) or "-"

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


def photo_jpeg(seed: int = 0) -> bytes:
    """A 640x480 JPEG, the size of a typical upload (decode + resize is part of what is measured)."""
    rng = np.random.default_rng(seed)
    sample = shapes.render(rng, "blue", "triangle", min_side=480, max_side=480).image.resize((640, 480))
    buffer = io.BytesIO()
    sample.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def engine_images_per_second(model_dir: Path, batch: int, seconds: float) -> float:
    manifest = load_manifest(model_dir)
    artifact = manifest.find("onnx", "image", "fp32")
    assert artifact is not None
    engine = OnnxRuntimeEngine(model_dir / artifact.path, "image", precision="fp32")
    size = manifest.preprocess.image_size
    pixels = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    engine(pixels)  # warm-up
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        engine(pixels)
        images += batch
    elapsed = time.perf_counter() - start
    engine.close()
    return images / elapsed


def server_env(repository: Path, model: str, max_batch_size: int, **extra: str) -> dict[str, str]:
    """The environment a benchmarked server runs with: generous queue and timeout, so that load shows as latency."""
    return {
        **os.environ,
        "CLIPSERVE_MODEL_REPOSITORY": str(repository),
        "CLIPSERVE_MODEL": model,
        "CLIPSERVE_MAX_BATCH_SIZE": str(max_batch_size),
        "CLIPSERVE_REQUEST_TIMEOUT_S": "120",
        "CLIPSERVE_MAX_QUEUE": "4096",
        **extra,
    }


async def drive(url: str, body: dict, concurrency: int, seconds: float, *, timeout: float = 120) -> LoadResult:
    """`concurrency` workers, each sending its next request when the last one is over, for `seconds`. Every
    outcome is counted by kind; an exception ends that one request, never the worker or the run."""
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=CLIENT_KEEPALIVE_S
    )

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                try:
                    response = await client.post("/classify", json=body)
                except httpx.HTTPError as error:  # transport errors and timeouts: counted, and on to the next
                    outcomes[outcome_kind(error)] += 1
                    continue
                outcomes[outcome_kind(response)] += 1
                if response.status_code == 200:
                    latencies.append((time.perf_counter() - start) * 1000)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return LoadResult(concurrency, len(latencies), elapsed, latencies, dict(outcomes))


def benchmark_model(repository: Path, model: str, args: argparse.Namespace) -> dict:
    model_dir = repository / model
    print(f"== {model}: raw image engine (ONNX Runtime fp32, CPU)", flush=True)
    engine = {batch: engine_images_per_second(model_dir, batch, args.engine_seconds) for batch in (1, args.max_batch)}
    for batch, rate in engine.items():
        print(f"   batch {batch:>3}: {rate:7.1f} images/s", flush=True)
    with server_process(SERVE_COMMAND, server_env(repository, model, args.max_batch), f"benchmark-{model}") as server:
        url = server.url
        body = {"images": [base64.b64encode(photo_jpeg()).decode()], "labels": LABELS, "templates": "simple"}
        httpx.post(f"{url}/classify", json=body, timeout=300).raise_for_status()  # label vectors now cached
        results = []
        for concurrency in args.concurrency:
            result = asyncio.run(drive(url, body, concurrency, args.seconds))
            results.append(result)
            p50, p99 = result.percentile(50), result.percentile(99)
            print(
                f"   /classify concurrency {concurrency:>3}: {result.rps:7.1f} req/s, p50 {p50:7.1f} ms,"
                f" p99 {p99:7.1f} ms, {result.requests} ok, {result.errors} errors ({result.error_kinds()})",
                flush=True,
            )
        server.keep_log = any(r.errors for r in results)  # for a look at what the server said
    return {"model": model, "engine": engine, "results": results}


def markdown(reports: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "# /classify benchmark",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()} with "
        f"{os.cpu_count()} CPU cores, ONNX Runtime CPU, fp32 graphs. One 640x480 JPEG per request, "
        f"{len(LABELS)} labels (cached), CLIPSERVE_MAX_BATCH_SIZE={args.max_batch}, {args.seconds:g} s per level. "
        "Reproduce: `python -m loadtests.benchmark` (see its --help).",
        "",
        "| model | raw engine, batch 1 | raw engine, batch "
        f"{args.max_batch} | concurrency | requests/s | p50 ms | p99 ms | requests/s ÷ raw batch-{args.max_batch} "
        "| 200s | errors by kind |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for report in reports:
        raw_1, raw_max = report["engine"][1], report["engine"][args.max_batch]
        for result in report["results"]:
            lines.append(
                f"| {report['model']} | {raw_1:.1f} img/s | {raw_max:.1f} img/s | {result.concurrency} "
                f"| {result.rps:.1f} | {result.percentile(50):.1f} | {result.percentile(99):.1f} "
                f"| {result.rps / raw_max:.2f} | {result.requests} | {result.error_kinds()} |"
            )
    errors = sum(r.errors for report in reports for r in report["results"])
    lines += [
        "",
        "Requests/s and latencies count only the 200s. Errors are every other outcome: a status code, or the "
        "exception the client got instead of an answer (ReadError, RemoteProtocolError, ReadTimeout, ...). "
        + ("Every request was answered 200." if not errors else f"**{errors} request(s) failed.**"),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, action="append", help="model repository (repeat per --model)")
    parser.add_argument("--model", action="append", help="model name in the repository (repeatable)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=10.0, help="load per concurrency level")
    parser.add_argument("--engine-seconds", type=float, default=5.0, help="raw engine timing per batch size")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--report", type=Path, default=Path(__file__).parent / "BENCHMARK.md")
    args = parser.parse_args(argv)
    models = args.model or [EXPORT_NAME]
    repositories = args.repository or [REPOSITORY_DIR]
    if len(repositories) == 1:
        repositories = repositories * len(models)
    reports = [benchmark_model(repo, model, args) for repo, model in zip(repositories, models, strict=True)]
    text = markdown(reports, args)
    args.report.write_text(text)
    print(text)
    print(f"report written to {args.report}")
    errors: Counter[str] = Counter()
    for report in reports:
        for result in report["results"]:
            errors.update({kind: n for kind, n in result.outcomes.items() if kind != "200"})
    if errors:
        print(f"{sum(errors.values())} request(s) failed: {', '.join(f'{k} {n}' for k, n in errors.most_common())}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
