"""`make bench`'s targets, report and plots on a run's results, and the whole run on the demo model (slow).

The results dict is what `python -m loadtests.bench` writes to docs/benchmarks.json; here one is built by hand
with round numbers, so every ratio the targets compute can be checked exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")

from loadtests.bench import __main__ as bench
from loadtests.bench import plots, report, services, targets

OURS, BASELINE = "clipserve vit-b-32", "transformers app"


def level(service: str, labels: int, concurrency: int, rps: float | None, p50: float | None) -> dict[str, Any]:
    return {
        "service": service,
        "labels": labels,
        "concurrency": concurrency,
        "requests_per_s": rps,
        "p50_ms": p50,
        "p99_ms": None if p50 is None else p50 * 1.5,
        "ok": 10,
        "errors": "-",
        "note": "" if rps else "not run: too slow",
    }


def engine(runtime: str, precision: str, batch: int, rate: float, note: str = "") -> dict[str, Any]:
    return {
        "model": "vit-b-32",
        "runtime": runtime,
        "precision": precision,
        "batch": batch,
        "images_per_s": rate,
        "note": note,
        "min_cosine_vs_fp32": None if precision == "fp32" else 0.9995,
        "gflop_per_image": 8.8,
        "engine": "",
    }


def a_run() -> dict[str, Any]:
    levels = [
        level(OURS, 10, 1, 15.0, 60.0),
        level(OURS, 10, 32, 18.0, 1700.0),
        level(OURS, 1000, 1, 14.0, 66.0),
        level(BASELINE, 10, 1, 1.2, 840.0),
        level(BASELINE, 10, 32, 1.5, 20000.0),
        level(BASELINE, 1000, 1, 0.02, 60000.0),
        level(BASELINE, 1000, 32, None, None),
    ]
    engines = [
        engine("onnxruntime", "fp32", 1, 20.0),
        engine("onnxruntime", "fp32", 32, 20.0),
        engine("onnxruntime", "int8", 32, 44.0),
        engine("openvino", "bf16", 32, 90.0, "below the service's bf16 gate (0.999) on random inputs"),
    ]
    breakdown = {
        "model": "vit-b-32",
        "labels": 10,
        "requests": 5,
        "client_ms": 60.0,
        "stages_ms": {"parse": 0.5, "base64": 0.5, "preprocess": 5.0, "image_engine": 48.0, "labels": 0.1, "app": 57.0},
    }
    many = {**breakdown, "labels": 1000, "client_ms": 66.0}
    return {
        "machine": {
            "date_utc": "2026-11-30T00:00:00+00:00",
            "cpu_model": "Test CPU",
            "cpu_flags": ["avx2"],
            "logical_cores": 2,
            "memory_gib": 24.0,
            "os": "Linux",
            "python": "3.11",
            "numpy_blas": "openblas",
            "packages": {"numpy": "2.0", "torch": "-"},
        },
        "wall_s": 600.0,
        "matmul_gflops": 200.0,
        "vit_gflop_per_image": 8.8,
        "engines": engines,
        "levels": levels,
        "breakdowns": [breakdown, many],
        "label_cache": {
            "vit-b-32": {
                "labels": 1000,
                "cold_ms": 9000.0,
                "vectors_warm_ms": 70.0,
                "set_warm_ms": 66.0,
                "prompts_per_s": 111.0,
            }
        },
        "target_notes": [],
    }


def test_targets_are_the_measured_ratios_with_verdicts() -> None:
    run = a_run()
    found = {target.name: target for target in bench.check_targets(run)}
    latency_10 = found["≥ 2× the transformers app at 10 labels"]
    assert latency_10.measured == pytest.approx(840 / 60) and latency_10.verdict == "met"
    throughput = found["≥ 2× the transformers app's throughput at 10 labels"]
    assert throughput.measured == pytest.approx(18 / 1.5) and "concurrency 32" in throughput.detail
    assert found["≥ 50× the transformers app at 1000 labels"].measured == pytest.approx(60000 / 66)
    labels_cost = found["warm 1,000-label latency ≤ 1.2× the 10-label latency"]
    assert labels_cost.measured == pytest.approx(1.1) and labels_cost.verdict == "met"
    overhead = found["latency at concurrency 1 ≤ engine + preprocessing + 10 ms"]
    assert overhead.measured == pytest.approx(60 / (48 + 5.5 + 10)) and overhead.verdict == "met"
    assert "6.5 ms of serving overhead" in overhead.detail and "took 50.0 ms" in overhead.detail
    batching = found["/classify at concurrency 32 ≥ 85 % of the raw engine's images/s"]
    assert batching.measured == pytest.approx(0.9) and batching.verdict == "met"
    ceiling = found["ONNX Runtime fp32 ≥ 80 % of the matmul-implied ceiling at batch 32"]
    assert ceiling.measured == pytest.approx(20 * 8.8 / 200) and ceiling.verdict == "met"
    reduced = found["fastest reduced precision ≥ 2× fp32"]
    # OpenVINO bf16 is faster but below its gate: the fastest engine within its gate is int8.
    assert reduced.measured == pytest.approx(44 / 20) and "int8" in reduced.detail


def test_a_missed_or_unmeasured_target_says_so() -> None:
    run = a_run()
    run["levels"] = [lv for lv in run["levels"] if lv["service"] != BASELINE]
    run["breakdowns"][1]["client_ms"] = 90.0  # 1,000 labels now 1.5x the 10-label latency
    found = {target.name: target for target in bench.check_targets(run)}
    assert found["≥ 2× the transformers app at 10 labels"].verdict == "not measured"
    assert found["warm 1,000-label latency ≤ 1.2× the 10-label latency"].verdict == "missed"
    assert targets.Target("x", None, 1.0, True, "").to_dict()["verdict"] == "not measured"


def test_report_and_plots_from_a_run(tmp_path: Path) -> None:
    run = a_run()
    run["engines"][2]["images_per_s"] = 21.0  # int8 as fast as fp32, as on a CPU without VNNI (flags: avx2 only)
    run["targets"] = [target.to_dict() for target in bench.check_targets(run)]
    run["target_notes"] = bench.target_notes(run)
    assert run["target_notes"] and "AMX" in run["target_notes"][0]
    bench.write(run, tmp_path)
    text = (tmp_path / "benchmarks.md").read_text()
    for heading in ("## Targets", "## Raw image engines", "## /classify over HTTP", "## Where a request's time goes"):
        assert heading in text
    assert "Test CPU" in text and "| transformers app | 1,000 | 32 | - |" in text
    assert json.loads((tmp_path / "benchmarks.json").read_text())["matmul_gflops"] == 200.0
    for name in ("engines", "http", "breakdown"):
        assert (tmp_path / "benchmarks" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.markdown(run) == text
    again = tmp_path / "again"
    assert bench.main(["--render", str(tmp_path / "benchmarks.json"), "--out", str(again)]) == 0
    assert (again / "benchmarks.md").read_text() == text  # the same numbers give the same report


def test_the_breakdown_adds_up_to_the_client_latency() -> None:
    breakdown = a_run()["breakdowns"][0]
    segments = dict(plots.breakdown_segments(breakdown))
    assert sum(segments.values()) == pytest.approx(breakdown["client_ms"])
    assert segments["outside"] == pytest.approx(3.0) and segments["other"] == pytest.approx(57 - 54)
    assert "labels" not in segments  # beside the images' path, not on it


def test_server_timing_header_is_read_per_stage() -> None:
    header = 'parse;dur=0.412, image_engine;desc="engine";dur=48.5,app;dur=57'
    assert services.server_timing(header) == {"parse": 0.412, "image_engine": 48.5, "app": 57.0}
    assert services.server_timing("") == {}


@pytest.mark.slow
def test_a_demo_only_run_writes_the_report(tmp_path: Path) -> None:
    """The real thing on the demo model with short levels: servers, engines, breakdown, report."""
    command = [sys.executable, "-m", "loadtests.bench", "--demo-only", "--seconds", "0.5", "--out", str(tmp_path)]
    command += ["--engine-seconds", "0.05", "--breakdown-requests", "3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = json.loads((tmp_path / "benchmarks.json").read_text())
    assert {lv["concurrency"] for lv in run["levels"]} == {1, 8, 32}
    assert all(lv["errors"] == "-" for lv in run["levels"])
    assert {b["labels"] for b in run["breakdowns"]} == {10, 1000}
    assert "image_engine" in run["breakdowns"][0]["stages_ms"]
