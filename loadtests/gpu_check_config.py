"""What the GPU check measures (full sizes on a GPU, tiny ones in --dry-run), how it records, and how it times.

A section writes its results through a `Recorder`, which rewrites the section's JSON file after every row, so a
section killed at its time limit still reports the rows it finished.
"""

from __future__ import annotations

import json
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Issue 9's acceptance targets, read off the report.
KERNEL_TARGET = {"B": 256, "C": 21_843, "D": 768, "dtype": "float16", "speedup": 3.0}
ENGINE_TARGET = {"precision": "fp16", "cuda_graphs": True, "batch": 256, "input": "device", "images_s": 20_000.0}
BF16_PEAK_TFLOPS = 790.0  # dense bf16 (and fp16) matrix rate measured on the lent H200 (8192³ products)


@dataclass(frozen=True)
class EngineRun:
    precision: str
    cuda_graphs: bool
    batches: tuple[int, ...]
    input: str = "device"  # "device": pixels already on the GPU (GPU preprocessing); "host": numpy, copied per call


@dataclass(frozen=True)
class Config:
    dry_run: bool
    device: str  # "cuda" or "cpu"
    fatbin: Path
    # (a) the kernel against PyTorch and numpy
    batches: tuple[int, ...] = (1, 64, 256)
    label_counts: tuple[int, ...] = (10, 1000, 21_843, 100_000)
    dims: tuple[int, ...] = (512, 768)
    dtype: str = "float16"
    extra_dtypes: dict[tuple[int, int, int], tuple[str, ...]] = field(
        default_factory=lambda: {(256, 21_843, 768): ("float32", "bfloat16")}
    )
    top_k: int = 5
    numpy_max_scores: int = 256 * 21_843  # B×C above this: the numpy path takes seconds per call, skipped
    warmup: int = 3
    reps: int = 20
    rep_seconds: float = 0.15  # most time spent on one measurement once 3 reps are done
    profile_reps: int = 5
    # (b) ViT-B-32 in the torch engine
    engine_arch: str = "ViT-B-32"
    engine_runs: tuple[EngineRun, ...] = (
        EngineRun("fp16", True, (1, 64, 256)),
        EngineRun("fp16", False, (1, 64, 256)),
        EngineRun("bf16", True, (256,)),
        EngineRun("fp16", True, (256,), input="host"),
    )
    engine_reps: int = 5
    engine_seconds: float = 0.3
    peak_tflops: float = BF16_PEAK_TFLOPS
    # (c) preprocessing, loadtests.preprocess_parity.measure's arguments
    preprocess: dict[str, Any] = field(
        default_factory=lambda: {"photos": 8, "probes": 32, "sizes": (0, 224), "batch": 64, "seconds": 0.3}
    )
    # (d) /classify end to end: (CLIPSERVE_SIMILARITY, concurrency levels)
    serve_runs: tuple[tuple[str, tuple[int, ...]], ...] = (("cuda", (1, 32, 128)), ("numpy", (32,)))
    serve_seconds: float = 6.0
    serve_warmup_seconds: float = 2.0
    serve_precision: str = "fp16"
    serve_max_batch: int = 64


def config_for(*, dry_run: bool, cuda: bool, fatbin: Path) -> Config:
    if not dry_run:
        return Config(dry_run=False, device="cuda" if cuda else "cpu", fatbin=fatbin)
    # Every code path once, at sizes a 2-core CPU runs in seconds; GPU-only measurements record why they are absent.
    return Config(
        dry_run=True,
        device="cpu",
        fatbin=fatbin,
        batches=(1, 4),
        label_counts=(10, 1000),
        dims=(512,),
        dtype="float32",
        extra_dtypes={},
        warmup=1,
        reps=3,
        rep_seconds=0.05,
        profile_reps=2,
        engine_runs=(EngineRun("fp32", False, (1,)), EngineRun("fp16", True, (256,))),
        engine_reps=2,
        engine_seconds=0.01,
        preprocess={"photos": 1, "probes": 2, "sizes": (0,), "batch": 4, "seconds": 0.02},
        serve_runs=(("cuda", (1,)), ("numpy", (1, 4))),
        serve_seconds=1.0,
        serve_warmup_seconds=0.3,
        serve_precision="fp32",
        serve_max_batch=8,
    )


class SectionSkipped(Exception):
    """A section (or one measurement) that cannot run here; the message says why."""


class Recorder:
    """A section's results, rewritten to `path` (JSON) after every change."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.data: dict[str, Any] = {"status": "running"}

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.flush()

    def row(self, table: str, row: dict[str, Any]) -> None:
        self.data.setdefault(table, []).append(row)
        self.flush()

    def note(self, text: str) -> None:
        print(f"    note: {text}", flush=True)
        self.data.setdefault("notes", []).append(text)
        self.flush()

    def flush(self) -> None:
        if self.path is None:
            return
        staging = self.path.with_name(self.path.name + ".partial")
        staging.write_text(json.dumps(self.data, default=to_json, indent=1))
        staging.replace(self.path)


def to_json(value: Any) -> Any:
    """numpy scalars and paths in results: numbers and strings."""
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    return str(value)


Section = Callable[[Config, Recorder], None]


def run_guarded(function: Section, config: Config, recorder: Recorder) -> dict[str, Any]:
    """Run one section; whatever it raises is recorded in its results, never raised."""
    start = time.perf_counter()
    try:
        function(config, recorder)
        recorder.data["status"] = "ok"
    except SectionSkipped as skipped:
        recorder.data.update(status="skipped", reason=str(skipped))
    except Exception as error:  # recorded, so that the other sections still run
        recorder.data.update(
            status="error", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc()[-4000:]
        )
    recorder.data["seconds"] = time.perf_counter() - start
    recorder.flush()
    return recorder.data


def measure(row: dict[str, Any], column: str, function: Callable[[], Any]) -> Any:
    """row[column] = function(), or None with the reason in row["errors"][column]."""
    try:
        row[column] = function()
    except SectionSkipped as skipped:
        row[column] = None
        row.setdefault("skipped", {})[column] = str(skipped)
    except Exception as error:  # one failed measurement leaves the rest of the row and table standing
        row[column] = None
        row.setdefault("errors", {})[column] = f"{type(error).__name__}: {error}"[:500]
        print(f"    {column}: {type(error).__name__}: {error}", flush=True)
    return row[column]


def median_call_us(call: Callable[[], Any], *, warmup: int, reps: int, seconds: float, min_reps: int = 3) -> float:
    """Median wall time of one blocking call, in µs: `warmup` untimed calls, then up to `reps` timed ones,
    stopping early once `min_reps` are done and `seconds` have passed."""
    for _ in range(warmup):
        call()
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < reps:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
        if len(times) >= min_reps and time.perf_counter() - began >= seconds:
            break
    return statistics.median(times) * 1e6
