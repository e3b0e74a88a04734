"""Overload, bounded: about 4x the service's capacity for a while, then the proof that it recovered.

    python -m loadtests.overload                         # 20 s of overload; writes docs/overload.md
    python -m loadtests.overload --duration 5 --out /tmp/overload.md

Starts `clipserve serve` (the built-in demo model, no Redis) as a subprocess on a free port with a small
in-flight cap (CLIPSERVE_MAX_CONCURRENT_REQUESTS, --max-concurrent) so that overload is reachable on a laptop,
then:

1. baseline: sequential /classify requests (one image, fixed labels, so their vectors are cached): latency;
2. capacity: closed loop at --concurrency (4) for --capacity-s: requests/s;
3. overload: open loop at --multiplier (4) x capacity for --duration seconds: arrivals at a fixed pace
   whatever the answers, as real clients behave, with the server process's resident memory sampled;
4. idle for --idle-s, then recovery: sequential requests again;
5. SIGTERM: the drain, which must exit 0.

Acceptance, each a row of the report: every answer is a 200 or a 503 with Retry-After in the error shape (no
other status, no connection error); every 200 arrived within CLIPSERVE_REQUEST_TIMEOUT_S; the peak RSS stays
under the RSS before the load plus --rss-bound-mb; every recovery request is a 200 and their median latency is
back near the baseline's (at most 2x it + 20 ms, timing on a shared machine being noisy); the drain exits 0.
The exit status is 0 when all hold, 1 when any fails, 2 when the server did not start. It talks to the server
over HTTP only and imports nothing from `service`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

from loadtests.timing import SERVE_COMMAND, free_port, wait_ready

LABELS = ["a red circle", "a blue triangle", "a green square", "a yellow hexagon", "a purple star"]
RECOVERY_SLACK_MS = 20.0


# ------------------------------------------------------------------------------------------------ the server


def server_env(args: argparse.Namespace, state_dir: str) -> dict[str, str]:
    """The settings the run states in its report (CLIPSERVE_* the caller had set otherwise are replaced)."""
    return {
        "CLIPSERVE_MAX_CONCURRENT_REQUESTS": str(args.max_concurrent),
        "CLIPSERVE_MAX_QUEUE": str(args.max_queue),
        "CLIPSERVE_REQUEST_TIMEOUT_S": f"{args.request_timeout_s:g}",
        "CLIPSERVE_SHUTDOWN_GRACE_S": f"{args.grace_s:g}",
        "CLIPSERVE_STATE_DIR": state_dir,
    }


def start_server(port: int, settings: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    # The demo model and no Redis, whatever this shell exports.
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSERVE_")} | settings
    with log.open("wb") as sink:
        return subprocess.Popen(
            [*SERVE_COMMAND, "--port", str(port)], env=environment, stdout=sink, stderr=subprocess.STDOUT
        )


def rss_mb(pid: int) -> float:
    try:
        import psutil

        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # kB
        raise RuntimeError(f"no VmRSS for process {pid}") from None


class RssSampler:
    """The server's resident memory every `interval_s`, in a thread, each sample tagged with the current phase."""

    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.phase = "start"
        self.samples: list[tuple[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((self.phase, rss_mb(self.pid)))
            except (OSError, RuntimeError):
                return  # the process is gone
            self._stop.wait(self.interval_s)

    def now(self) -> float:
        return rss_mb(self.pid)

    def peak(self, phase: str) -> float:
        return max((mb for p, mb in self.samples if p == phase), default=float("nan"))


# -------------------------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Payload:
    body: bytes
    images: int


def request_body(images: int, width: int, height: int) -> Payload:
    """/classify's JSON, encoded once. The load generator shares the machine, so its work per request is kept
    small: a few KB to send, no JSON encoding per request; the server's is large: a 1600x1200 PNG of flat shapes
    compresses to about 20 KB but costs its full pixel count to decode and resize, as a screenshot does."""
    encoded = []
    for i in range(images):
        image = Image.new("RGB", (width, height), "lightgrey")
        draw = ImageDraw.Draw(image)
        for k in range(20):
            centre = (width * (k + 1) // 22, height // 2, min(width, height) // 8)
            draw.regular_polygon(centre, 3 + (k + i) % 5, fill=("blue", "red", "green")[k % 3])
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode())
    return Payload(json.dumps({"images": encoded, "labels": LABELS}).encode(), images)


@dataclass
class Outcome:
    status: int | None  # None: no answer (a connection error, a timeout)
    latency_ms: float
    retry_after: bool = False
    error_code: str | None = None
    problem: str | None = None  # why the answer is not acceptable


def judge(response: httpx.Response, latency_ms: float, images: int) -> Outcome:
    outcome = Outcome(response.status_code, latency_ms)
    if response.status_code == 200:
        if len(response.json().get("results", [])) != images:
            outcome.problem = "200 without one result per image"
    elif response.status_code == 503:
        outcome.retry_after = response.headers.get("retry-after", "").isdigit()
        try:
            error = response.json()["error"]
            outcome.error_code = str(error["code"])
            assert {"code", "message", "param"} <= set(error)
        except (ValueError, KeyError, TypeError, AssertionError):
            outcome.problem = "503 not in the error shape"
        if not outcome.retry_after:
            outcome.problem = "503 without Retry-After"
    else:
        outcome.problem = f"status {response.status_code}: {response.text[:200]}"
    return outcome


async def one(client: httpx.AsyncClient, payload: Payload) -> Outcome:
    start = time.perf_counter()
    try:
        response = await client.post("/classify", content=payload.body, headers={"content-type": "application/json"})
    except httpx.HTTPError as error:
        return Outcome(None, (time.perf_counter() - start) * 1000, problem=f"{type(error).__name__}: {error}")
    return judge(response, (time.perf_counter() - start) * 1000, payload.images)


async def sequential(client: httpx.AsyncClient, payload: Payload, count: int) -> list[Outcome]:
    return [await one(client, payload) for _ in range(count)]


async def closed_loop(
    client: httpx.AsyncClient, payload: Payload, concurrency: int, seconds: float
) -> tuple[float, int]:
    """Requests/s with `concurrency` clients each sending its next request when the last is answered."""
    done = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            if (await one(client, payload)).status == 200:
                done += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - start), done


@dataclass
class OpenLoop:
    outcomes: list[Outcome] = field(default_factory=list)
    sent: int = 0
    send_span_s: float = 0.0
    client_in_flight_peak: int = 0


async def open_loop(
    client: httpx.AsyncClient, payload: Payload, rate: float, seconds: float, progress: Callable[[OpenLoop, int], None]
) -> OpenLoop:
    """Arrivals every 1/rate seconds whatever the answers (a late sender catches up at once, keeping the rate)."""
    run = OpenLoop()
    pending: set[asyncio.Task[None]] = set()
    total = max(1, round(rate * seconds))

    async def fire() -> None:
        run.outcomes.append(await one(client, payload))

    loop = asyncio.get_running_loop()
    start = loop.time()
    next_progress = start + 2.0
    for i in range(total):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(fire())
        pending.add(task)
        task.add_done_callback(pending.discard)
        run.sent += 1
        run.client_in_flight_peak = max(run.client_in_flight_peak, len(pending))
        if loop.time() >= next_progress:
            progress(run, len(pending))
            next_progress += 2.0
    run.send_span_s = loop.time() - start
    await asyncio.gather(*pending)
    return run


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


# ------------------------------------------------------------------------------------------------------- run


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class Report:
    settings: dict[str, str]
    args: argparse.Namespace
    baseline_ms: float = 0.0
    capacity_rps: float = 0.0
    offered_rps: float = 0.0
    overload: OpenLoop = field(default_factory=OpenLoop)
    recovery: list[Outcome] = field(default_factory=list)
    ready_after: int | None = None  # /readyz's status after the recovery requests
    rss: dict[str, float] = field(default_factory=dict)
    exit_code: int | None = None
    exit_s: float = 0.0
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)


def evaluate(report: Report) -> list[Check]:
    args, outcomes = report.args, report.overload.outcomes
    ok = [o for o in outcomes if o.status == 200]
    problems = [o.problem for o in outcomes if o.problem]
    recovery_ok = [o for o in report.recovery if o.status == 200]
    recovery_p50 = statistics.median(o.latency_ms for o in report.recovery) if report.recovery else float("nan")
    recovery_bound = 2 * report.baseline_ms + RECOVERY_SLACK_MS
    slowest = max((o.latency_ms for o in ok), default=0.0)
    rss_bound = report.rss["before"] + args.rss_bound_mb
    refused = sum(o.status == 503 for o in outcomes)
    return [
        Check(
            "every answer is a 200 or a 503 with Retry-After (error shape); no connection errors",
            not problems and len(outcomes) == report.overload.sent,
            f"{len(ok)} x 200, {refused} x 503, {len(problems)} other"
            + (f" (first: {problems[0]})" if problems else ""),
        ),
        Check("the overload was real: some requests were refused", refused > 0, f"{refused} refused"),
        Check(
            f"every 200 within CLIPSERVE_REQUEST_TIMEOUT_S ({args.request_timeout_s:g} s)",
            slowest <= args.request_timeout_s * 1000,
            f"slowest 200: {slowest:.0f} ms",
        ),
        Check(
            f"peak RSS < RSS before + {args.rss_bound_mb:g} MB",
            report.rss["peak"] < rss_bound,
            f"{report.rss['peak']:.0f} MB < {rss_bound:.0f} MB",
        ),
        Check(
            f"recovery: {len(report.recovery)} sequential requests all 200, /readyz 200",
            len(recovery_ok) == len(report.recovery) > 0 and report.ready_after == 200,
            f"{len(recovery_ok)} of {len(report.recovery)}; /readyz {report.ready_after}",
        ),
        Check(
            f"recovery p50 <= 2 x baseline p50 + {RECOVERY_SLACK_MS:g} ms",
            recovery_p50 <= recovery_bound,
            f"{recovery_p50:.1f} ms <= {recovery_bound:.1f} ms",
        ),
        Check(
            f"SIGTERM afterwards: exit 0 within CLIPSERVE_SHUTDOWN_GRACE_S ({args.grace_s:g} s)",
            report.exit_code == 0 and report.exit_s <= args.grace_s + 1,
            f"exit {report.exit_code} after {report.exit_s:.1f} s",
        ),
    ]


def run(args: argparse.Namespace) -> Report | None:
    state_dir = tempfile.mkdtemp(prefix="clipserve-overload-")
    log = Path(state_dir) / "server.log"
    settings = server_env(args, state_dir)
    report = Report(settings, args)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    print(f"starting clipserve on {url} ({' '.join(f'{k}={v}' for k, v in settings.items())})", flush=True)
    server = start_server(port, settings, log)
    try:
        try:
            wait_ready(url, server, timeout=120)
        except (RuntimeError, TimeoutError):
            print(f"the server did not turn ready; its log ({log}):\n{log.read_text(errors='replace')[-3000:]}")
            return None
        with RssSampler(server.pid) as rss:
            asyncio.run(_drive(url, args, report, rss))
            rss.phase = "after"
            report.rss["after"] = rss.now()
        start = time.monotonic()
        server.send_signal(signal.SIGTERM)
        try:
            report.exit_code = server.wait(timeout=args.grace_s + 10)
        except subprocess.TimeoutExpired:
            report.exit_code = None
        report.exit_s = time.monotonic() - start
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    report.checks = evaluate(report)
    if report.passed:
        shutil.rmtree(state_dir, ignore_errors=True)
    else:
        print(f"server log: {log}")
    return report


async def _drive(url: str, args: argparse.Namespace, report: Report, rss: RssSampler) -> None:
    payload = request_body(args.images, *args.image_size)
    # Enough connections that the client never queues: the server is what refuses.
    limits = httpx.Limits(max_connections=2048, max_keepalive_connections=2048)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout_s + 10, limits=limits) as client:
        await sequential(client, payload, 5)  # label vectors cached, engines warm
        baseline = await sequential(client, payload, args.recovery)
        report.baseline_ms = statistics.median(o.latency_ms for o in baseline)
        print(f"baseline: p50 {report.baseline_ms:.1f} ms over {len(baseline)} sequential requests", flush=True)

        report.capacity_rps, done = await closed_loop(client, payload, args.concurrency, args.capacity_s)
        report.offered_rps = args.multiplier * report.capacity_rps
        print(
            f"capacity: {report.capacity_rps:.1f} req/s ({done} requests at concurrency {args.concurrency}, "
            f"{args.capacity_s:g} s)",
            flush=True,
        )
        report.rss["before"] = rss.now()
        print(
            f"overload: {report.offered_rps:.1f} req/s offered ({args.multiplier:g}x) for {args.duration:g} s; "
            f"RSS before {report.rss['before']:.0f} MB",
            flush=True,
        )

        def progress(run: OpenLoop, pending: int) -> None:
            answered = run.outcomes
            print(
                f"  sent {run.sent}: {sum(o.status == 200 for o in answered)} x 200, "
                f"{sum(o.status == 503 for o in answered)} x 503, {sum(o.problem is not None for o in answered)} "
                f"bad, {pending} in flight, RSS {rss.now():.0f} MB",
                flush=True,
            )

        rss.phase = "overload"
        report.overload = await open_loop(client, payload, report.offered_rps, args.duration, progress)
        rss.phase = "idle"
        report.rss["peak"] = rss.peak("overload")
        print(f"idle {args.idle_s:g} s", flush=True)
        await asyncio.sleep(args.idle_s)
        rss.phase = "recovery"
        report.recovery = await sequential(client, payload, args.recovery)
        report.ready_after = (await client.get("/readyz")).status_code


# ---------------------------------------------------------------------------------------------------- report


def markdown(report: Report) -> str:
    args, run = report.args, report.overload
    ok = [o.latency_ms for o in run.outcomes if o.status == 200]
    refused = [o for o in run.outcomes if o.status == 503]
    codes = sorted({o.error_code or "?" for o in refused})
    recovery = [o.latency_ms for o in report.recovery]
    achieved = run.sent / run.send_span_s if run.send_span_s else float("nan")
    rows = [
        (f"capacity (closed loop, concurrency {args.concurrency}, {args.capacity_s:g} s)",
         f"{report.capacity_rps:.1f} req/s"),
        (f"offered ({args.multiplier:g}x capacity, open loop, {args.duration:g} s)", f"{report.offered_rps:.1f} req/s "
         f"(achieved {achieved:.1f}; {run.sent} requests)"),
        ("answers: 200", f"{len(ok)} ({len(ok) / max(1, len(run.outcomes)):.0%}); {len(ok) / args.duration:.1f} req/s"),
        ("answers: 503 with Retry-After", f"{len(refused)} (codes: {', '.join(codes) or '-'})"),
        ("answers: anything else / no answer", f"{sum(o.problem is not None for o in run.outcomes)}"),
        ("accepted latency p50 / p99 / max", f"{percentile(ok, 50):.0f} / {percentile(ok, 99):.0f} / "
         f"{max(ok, default=float('nan')):.0f} ms"),
        ("refused latency p50", f"{percentile([o.latency_ms for o in refused], 50):.1f} ms"),
        ("client-side requests in flight, peak", f"{run.client_in_flight_peak}"),
        ("baseline latency p50 (sequential)", f"{report.baseline_ms:.1f} ms"),
        ("recovery latency p50 (sequential)", f"{statistics.median(recovery) if recovery else float('nan'):.1f} ms"),
        ("server RSS before / peak / after", f"{report.rss['before']:.0f} / {report.rss['peak']:.0f} / "
         f"{report.rss['after']:.0f} MB"),
        ("exit after SIGTERM", f"{report.exit_code} in {report.exit_s:.1f} s"),
    ]  # fmt: skip
    settings = ", ".join(f"`{k}={v}`" for k, v in report.settings.items() if k != "CLIPSERVE_STATE_DIR")
    lines = [
        "# Overload: refusals, bounded memory, recovery",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M UTC} on {platform.machine()} with {os.cpu_count()} CPU cores "
        "(shared: the load generator runs on the same machine), the built-in demo model on ONNX Runtime CPU, no "
        f"Redis. Server settings: {settings}. Each request: {args.images} PNG(s) of flat shapes, "
        f"{args.image_size[0]}x{args.image_size[1]}, {len(LABELS)} fixed labels "
        "(their vectors cached). Reproduce: `python -m loadtests.overload` (see its --help).",
        "",
        "| measure | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
        "| acceptance | result | detail |",
        "|---|---|---|",
        *(f"| {c.name} | {'PASS' if c.passed else 'FAIL'} | {c.detail} |" for c in report.checks),
        "",
        f"Overall: **{'PASS' if report.passed else 'FAIL'}**.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of overload")
    parser.add_argument("--out", type=Path, default=Path("docs/overload.md"), help="the Markdown report")
    parser.add_argument("--multiplier", type=float, default=4.0, help="offered rate / measured capacity")
    parser.add_argument("--concurrency", type=int, default=4, help="closed-loop clients measuring capacity")
    parser.add_argument("--capacity-s", type=float, default=4.0, help="seconds measuring capacity")
    parser.add_argument("--idle-s", type=float, default=3.0, help="pause between the overload and recovery")
    parser.add_argument("--recovery", type=int, default=20, help="sequential requests for baseline and recovery")
    parser.add_argument("--images", type=int, default=1, help="images per /classify request")
    parser.add_argument(
        "--image-size", type=int, nargs=2, default=(1600, 1200), metavar=("W", "H"), help="each PNG's size"
    )
    parser.add_argument("--max-concurrent", type=int, default=16, help="CLIPSERVE_MAX_CONCURRENT_REQUESTS")
    parser.add_argument("--max-queue", type=int, default=64, help="CLIPSERVE_MAX_QUEUE")
    parser.add_argument("--request-timeout-s", type=float, default=10.0, help="CLIPSERVE_REQUEST_TIMEOUT_S")
    parser.add_argument("--grace-s", type=float, default=4.0, help="CLIPSERVE_SHUTDOWN_GRACE_S")
    parser.add_argument("--rss-bound-mb", type=float, default=300.0, help="allowed RSS growth at the peak")
    args = parser.parse_args(argv)
    started = time.monotonic()
    report = run(args)
    if report is None:
        return 2
    text = markdown(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print("\n" + text)
    print(f"wrote {args.out} in {time.monotonic() - started:.0f} s")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
