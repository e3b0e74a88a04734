"""Issue 13's targets, each checked against numbers measured in one `make bench` run.

A target is a measured ratio, the bound it must meet, a verdict and a sentence on what the ratio compares. When a
number it needs was not measured (a runtime missing here, a level skipped), the verdict says so instead of passing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    name: str
    measured: float | None  # the ratio; None: could not be computed from this run
    bound: float
    at_least: bool  # measured >= bound passes (else measured <= bound passes)
    detail: str  # what was compared, with the numbers

    @property
    def verdict(self) -> str:
        if self.measured is None:
            return "not measured"
        met = self.measured >= self.bound if self.at_least else self.measured <= self.bound
        return "met" if met else "missed"

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "verdict": self.verdict}


def _level(levels: list[dict], service: str, labels: int, concurrency: int) -> dict | None:
    for level in levels:
        if (level["service"], level["labels"], level["concurrency"]) == (service, labels, concurrency):
            return level if level["requests_per_s"] is not None else None
    return None


def _engine(engines: list[dict], model: str, runtime: str, precision: str, batch: int) -> float | None:
    for row in engines:
        if (row["model"], row["runtime"], row["precision"], row["batch"]) == (model, runtime, precision, batch):
            return row["images_per_s"]
    return None


def _get(row: dict | None, key: str) -> float | None:
    return None if row is None else row[key]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def against_baseline(levels: list[dict], ours: str, baseline: str, labels: int, bound: float) -> Target:
    """Latency at concurrency 1 (the baseline's p50 over ours): what one user waiting on one request sees."""
    mine, theirs = _level(levels, ours, labels, 1), _level(levels, baseline, labels, 1)
    measured = _ratio(_get(theirs, "p50_ms"), _get(mine, "p50_ms"))
    detail = (
        f"p50 at concurrency 1, {labels} labels: {baseline} {theirs['p50_ms']:.0f} ms, {ours} {mine['p50_ms']:.1f} ms"
        if mine and theirs
        else f"{labels} labels at concurrency 1 not measured for both"
    )
    return Target(f"≥ {bound:g}× the transformers app at {labels} labels", measured, bound, True, detail)


def throughput_against_baseline(levels: list[dict], ours: str, baseline: str, labels: int, bound: float) -> Target:
    """Requests/s at the highest concurrency both were driven at: what a busy service sustains."""
    both = [
        c
        for c in sorted({level["concurrency"] for level in levels}, reverse=True)
        if _level(levels, ours, labels, c) and _level(levels, baseline, labels, c)
    ]
    if not both:
        return Target(f"≥ {bound:g}× its throughput at {labels} labels", None, bound, True, "no common level")
    c = both[0]
    mine, theirs = _level(levels, ours, labels, c), _level(levels, baseline, labels, c)
    assert mine and theirs
    return Target(
        f"≥ {bound:g}× the transformers app's throughput at {labels} labels",
        _ratio(mine["requests_per_s"], theirs["requests_per_s"]),
        bound,
        True,
        f"requests/s at concurrency {c}: {ours} {mine['requests_per_s']:.2f}, {baseline} "
        f"{theirs['requests_per_s']:.2f}",
    )


def label_count_cost(breakdowns: list[dict], model: str, bound: float = 1.2) -> Target:
    """From the breakdown's requests, where 10 and 1,000 labels took turns: on a shared machine two load levels a
    minute apart can differ by more than the label count does."""
    few = next((b for b in breakdowns if (b["model"], b["labels"]) == (model, 10)), None)
    many = next((b for b in breakdowns if (b["model"], b["labels"]) == (model, 1000)), None)
    detail = (
        f"{model} median latency at concurrency 1, the two label counts taking turns: 1,000 warm labels "
        f"{many['client_ms']:.1f} ms, 10 labels {few['client_ms']:.1f} ms"
        if few and many
        else "not measured"
    )
    return Target(
        "warm 1,000-label latency ≤ 1.2× the 10-label latency",
        _ratio(_get(many, "client_ms"), _get(few, "client_ms")),
        bound,
        False,
        detail,
    )


def serving_overhead(breakdown: dict | None, engines: list[dict], model: str, slack_ms: float = 10) -> Target:
    """Request latency at concurrency 1 against the engine's batch-1 time plus preprocessing plus `slack_ms`; the
    ratio is latency over that budget (≤ 1 meets it). Latency, engine and preprocessing all come from the same
    sequential requests (their medians: client clock and Server-Timing), because on a shared machine the engine's
    own speed drifts by tens of percent between minutes; the standalone raw engine's batch-1 time, measured
    earlier in the run, is quoted beside it, so that an engine slowed down by the service would still show."""
    name = "latency at concurrency 1 ≤ engine + preprocessing + 10 ms"
    if not breakdown or "image_engine" not in breakdown["stages_ms"]:
        return Target(name, None, 1.0, False, "not measured")
    stages = breakdown["stages_ms"]
    engine_ms = stages["image_engine"]
    preprocess_ms = stages.get("base64", 0.0) + stages.get("preprocess", 0.0)
    budget = engine_ms + preprocess_ms + slack_ms
    rate = _engine(engines, model, "onnxruntime", "fp32", 1)
    standalone = f"; the standalone raw engine at batch 1 took {1000 / rate:.1f} ms earlier in the run" if rate else ""
    return Target(
        name,
        breakdown["client_ms"] / budget,
        1.0,
        False,
        f"{model}, {breakdown['labels']} labels: median latency {breakdown['client_ms']:.1f} ms against its image "
        f"engine call {engine_ms:.1f} ms + preprocessing {preprocess_ms:.1f} ms + {slack_ms:g} ms = {budget:.1f} ms, "
        f"so {breakdown['client_ms'] - engine_ms - preprocess_ms:.1f} ms of serving overhead{standalone}",
    )


def batching_efficiency(levels: list[dict], engines: list[dict], service: str, model: str, bound: float) -> Target:
    level = _level(levels, service, 10, 32)
    rate = _engine(engines, model, "onnxruntime", "fp32", 32)
    return Target(
        "/classify at concurrency 32 ≥ 85 % of the raw engine's images/s",
        _ratio(_get(level, "requests_per_s"), rate),
        bound,
        True,
        f"{service} at concurrency 32, 10 labels: {level['requests_per_s']:.2f} requests/s (one image each); raw "
        f"ONNX Runtime fp32 at batch 32: {rate:.2f} images/s"
        if level and rate
        else "not measured",
    )


def matmul_efficiency(engines: list[dict], model: str, gflop_per_image: float, matmul_gflops: float) -> Target:
    rate = _engine(engines, model, "onnxruntime", "fp32", 32)
    achieved = rate * gflop_per_image if rate else None
    return Target(
        "ONNX Runtime fp32 ≥ 80 % of the matmul-implied ceiling at batch 32",
        _ratio(achieved, matmul_gflops),
        0.8,
        True,
        f"{rate:.2f} images/s × {gflop_per_image:g} GFLOP = {achieved:.0f} GFLOP/s against numpy's fp32 matmul "
        f"{matmul_gflops:.0f} GFLOP/s"
        if rate and achieved
        else "not measured",
    )


def reduced_precision_speedup(engines: list[dict], model: str, batch: int = 32) -> Target:
    """The fastest engine below fp32 that is within the service's gate (OpenVINO bf16 is; dynamic int8 graphs pass
    the export's parity gate or are not written), against ONNX Runtime fp32 at the same batch."""
    fp32 = _engine(engines, model, "onnxruntime", "fp32", batch)
    candidates = [
        row
        for row in engines
        if row["model"] == model
        and row["batch"] == batch
        and row["precision"] in ("int8", "bf16", "fp16")
        and row["images_per_s"]
        and "below the service's bf16 gate" not in row.get("note", "")
    ]
    if not candidates or not fp32:
        return Target("fastest reduced precision ≥ 2× fp32", None, 2.0, True, "not measured")
    best = max(candidates, key=lambda row: row["images_per_s"])
    return Target(
        "fastest reduced precision ≥ 2× fp32",
        best["images_per_s"] / fp32,
        2.0,
        True,
        f"{best['runtime']} {best['precision']} {best['images_per_s']:.1f} images/s against ONNX Runtime fp32 "
        f"{fp32:.1f} at batch {batch}",
    )
