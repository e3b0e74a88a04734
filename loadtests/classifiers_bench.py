"""Saved classifiers, measured: how long a built-in classifier takes to prepare, what that preparation does to
live /classify latency meanwhile, and /classify latency by classifier name at 1,000 labels against 10.

Runs the app in this process (its lifespan, the served model's real engines, no Redis) and talks to it through
httpx's ASGI transport, so the numbers are the server's own, without network. Prints a Markdown table and
writes it to --out.

    python -m loadtests.classifiers_bench [--requests 40] [--out loadtests/CLASSIFIERS.md]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

from service.app import create_app
from service.settings import Settings

LIVE_LABELS = ["a red circle", "a blue triangle", "a green square", "a yellow hexagon", "a purple star"]


def _image() -> str:
    image = Image.new("RGB", (200, 150), "lightgrey")
    ImageDraw.Draw(image).ellipse((60, 35, 140, 115), fill="red")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


async def _latencies(client: httpx.AsyncClient, body: dict, count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        response = await client.post("/classify", json=body)
        times.append((time.perf_counter() - start) * 1000)
        response.raise_for_status()
    return times


def _p50(times: list[float]) -> float:
    return statistics.median(times)


async def measure(requests: int, budget_s: float) -> list[tuple[str, str]]:
    settings = Settings(state_dir=Path(tempfile.mkdtemp(prefix="clipserve-bench-")), request_timeout_s=600)
    app = create_app(settings)
    rows: list[tuple[str, str]] = []
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=600) as client:
            model = app.state.pipeline.model.name
            live = {"images": [_image()], "labels": LIVE_LABELS}
            await _latencies(client, live, 3)  # label vectors cached, engines warm
            idle = await _latencies(client, live, requests)
            print(f"live /classify, 5 labels, idle: p50 {_p50(idle):.1f} ms", flush=True)

            start = time.perf_counter()
            put = await client.put("/v1/classifiers/imagenet", json={"builtin": "imagenet-1k"})
            assert put.status_code == 202, put.text
            during: list[float] = []
            shown = -1
            while (status := (await client.get("/v1/classifiers/imagenet")).json())["status"] == "preparing":
                if time.perf_counter() - start > budget_s:
                    break  # a slow model: measure the rate for a while instead of waiting for the end
                during += await _latencies(client, live, 1)
                if status["prompts_prepared"] // 8000 != shown:  # a line per tenth
                    shown = status["prompts_prepared"] // 8000
                    print(f"preparing imagenet-1k: {status['prompts_prepared']:,} / 80,000 prompts", flush=True)
            prepare_s = time.perf_counter() - start
            print(
                f"{status['prompts_prepared']:,} prompts in {prepare_s:.1f} s; live p50 meanwhile {_p50(during):.1f} ms"
            )
            if status["status"] != "ready":
                rate = status["prompts_prepared"] / prepare_s
                rows += [
                    ("model", model),
                    (
                        f"imagenet-1k preparation, stopped after {prepare_s:.0f} s",
                        f"{status['prompts_prepared']:,} of 80,000 prompts ({rate:.0f} prompts/s)",
                    ),
                    ("80,000 prompts at that rate (extrapolated, not run to the end)", f"{80_000 / rate / 60:.0f} min"),
                    (f"live /classify p50, 5 inline labels, idle ({len(idle)} requests)", f"{_p50(idle):.1f} ms"),
                    (
                        f"live /classify p50 while imagenet-1k prepares ({len(during)} requests)",
                        f"{_p50(during):.1f} ms",
                    ),
                    ("ratio: during / idle", f"{_p50(during) / _p50(idle):.2f}"),
                ]
                return rows

            put10 = await client.put("/v1/classifiers/ten", json={"labels": [f"class {i}" for i in range(10)]})
            assert put10.status_code in (201, 202), put10.text
            while (await client.get("/v1/classifiers/ten")).json()["status"] == "preparing":
                await asyncio.sleep(0.05)
            by_1000 = await _latencies(client, {"images": [_image()], "classifier": "imagenet"}, requests)
            by_10 = await _latencies(client, {"images": [_image()], "classifier": "ten"}, requests)

    rows += [
        ("model", model),
        ("prepare imagenet-1k (1,000 labels x 80 templates = 80,000 prompts)", f"{prepare_s:.1f} s"),
        (f"live /classify p50, 5 inline labels, idle ({len(idle)} requests)", f"{_p50(idle):.1f} ms"),
        (f"live /classify p50 while imagenet-1k prepares ({len(during)} requests)", f"{_p50(during):.1f} ms"),
        ("ratio: during / idle", f"{_p50(during) / _p50(idle):.2f}"),
        (f"/classify by name p50, 1,000 labels ({requests} requests)", f"{_p50(by_1000):.1f} ms"),
        (f"/classify by name p50, 10 labels ({requests} requests)", f"{_p50(by_10):.1f} ms"),
    ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=40, help="requests per latency sample")
    parser.add_argument("--out", type=Path, default=Path("loadtests/CLASSIFIERS.md"))
    parser.add_argument("--budget-s", type=float, default=3600, help="stop preparing after this long, quote the rate")
    args = parser.parse_args()
    rows = asyncio.run(measure(args.requests, args.budget_s))
    table = "\n".join(["| measure | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)])
    report = (
        "# Saved classifiers: preparation time and live latency\n\n"
        "`python -m loadtests.classifiers_bench` (in-process app, no Redis, this machine's CPU; the served model "
        "is CLIPSERVE_MODEL_REPOSITORY / CLIPSERVE_MODEL, the built-in demo by default).\n\n" + table + "\n"
    )
    args.out.write_text(report)
    print("\n" + table)


if __name__ == "__main__":
    main()
