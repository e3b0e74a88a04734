"""Raw image-engine throughput: images/s of each runtime and precision on one model, with no service around it.

For one model directory of a clipserve model repository (its manifest lists the exported graphs), each engine is
built the way the service builds it by default and timed at each batch size on the same random pixels:

- ONNX Runtime (`OnnxRuntimeEngine`, default providers and threads) on the fp32 and int8 graphs, and on the fp16
  graph when one was exported. fp16 is timed at the smallest batch first and, when it is slower there than fp32
  (the usual case on a CPU: ONNX Runtime's CPU provider has few fp16 kernels and casts around the rest), not at
  the other batches; its row's note says so.
- OpenVINO (`OpenVinoEngine`, the service's LATENCY hint) on the fp32 graph, compiled in f32 and in bf16; bf16
  only where the CPU computes in it natively (the check the service's engine makes), else one row saying why.
- PyTorch eager (the service's `TorchEngine` on the CPU: the zoo's open_clip image tower under
  `torch.inference_mode()`, fp32). For the demo model these are its committed weights, the ones its graphs were
  exported from. For an open_clip model the tower is `open_clip.create_model(ARCH)` with no pretrained weights: a
  random init of the same architecture, which times the same but is not the exported model (its cosine against
  ONNX Runtime is not reported). A pretrained tag is never downloaded for this.

Every engine other than ONNX Runtime fp32 is also compared with it on the same random images: the smallest cosine
between their embeddings (`min_cosine_vs_fp32`), which for bf16 is what the service's startup gate checks
(service/engines/openvino.py, MIN_COSINE) on its own probe set.

Throughput is `loadtests.timing.rate_per_second`: one warm-up call, then the median of `reps` windows of at least
`seconds` each (a window holds at least one call, so big batches take longer than `seconds`). A runtime or precision
that cannot run here (not installed, no such graph, no bf16 on this CPU) gets one row at the smallest batch with
`images_per_s` None and the reason in `note`; the run goes on.

    python -m loadtests.bench.engines                                   # the built-in demo model
    python -m loadtests.bench.engines --repository /tmp/vitrepo --model ViT-B-32 --json engines.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.bench.machine import (
    VIT_B_32_GFLOP_PER_IMAGE,
    describe,
    load_average,
    matmul_gflops,
    onnx_gflop_per_image,
)
from loadtests.timing import rate_per_second
from models.demo.config import EXPORT_NAME, REPOSITORY_DIR
from models.manifest import Manifest, load_manifest
from models.scoring import row_cosines
from service.engines.base import EngineError

RUNTIMES = ("onnxruntime", "openvino", "torch")
DEFAULT_BATCHES = (1, 8, 32)
DEFAULT_SECONDS = 0.5
DEFAULT_REPS = 3
PARITY_IMAGES = 8
CPU_PROVIDER = "CPUExecutionProvider"

Encoder = Callable[[np.ndarray], np.ndarray]
Log = Callable[[str], None]


@dataclass(frozen=True)
class EngineResult:
    """One runtime/precision at one batch size. JSON-ready: `to_dict()`, and `EngineResult(**d)` reads it back."""

    model: str
    runtime: str  # "onnxruntime" | "openvino" | "torch"
    precision: str  # "fp32" | "int8" | "fp16" | "bf16"
    batch: int
    images_per_s: float | None  # None: not measured, `note` says why
    note: str = ""
    min_cosine_vs_fp32: float | None = None  # vs ONNX Runtime fp32 on the same random images; None: not comparable
    gflop_per_image: float | None = None  # the model's image-tower cost, when known
    engine: str = ""  # the engine's own description

    @property
    def measured(self) -> bool:
        return self.images_per_s is not None

    @property
    def ms_per_call(self) -> float | None:
        return None if not self.images_per_s else 1000 * self.batch / self.images_per_s

    @property
    def gflops(self) -> float | None:
        """Achieved GFLOP/s (images/s x GFLOP per image), when both are known."""
        if self.images_per_s is None or self.gflop_per_image is None:
            return None
        return self.images_per_s * self.gflop_per_image

    def fraction_of(self, ceiling_gflops: float) -> float | None:
        """Achieved GFLOP/s as a fraction of a ceiling (e.g. `machine.matmul_gflops()`)."""
        achieved = self.gflops
        return None if achieved is None or ceiling_gflops <= 0 else achieved / ceiling_gflops

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------- engines


@dataclass
class _Built:
    encode: Encoder
    close: Callable[[], None]
    description: str
    comparable: bool = True  # same weights as the ONNX graphs, so a cosine against ONNX Runtime fp32 means something
    note: str = ""  # goes on every row of this engine


def _onnxruntime(path: Path, precision: str, threads: int) -> _Built:
    from service.engines.onnxruntime import OnnxRuntimeEngine

    engine = OnnxRuntimeEngine(path, "image", precision=precision, intra_op_threads=threads)
    return _Built(engine, engine.close, engine.description)


def _openvino(path: Path, precision: str, threads: int) -> _Built:
    from service.engines.openvino import OpenVinoEngine, new_core

    hint = "f32" if precision == "fp32" else precision
    engine = OpenVinoEngine(path, "image", precision=hint, core=new_core(hint), threads=threads)
    return _Built(engine, engine.close, engine.description)


def openvino_bf16_missing() -> str | None:
    """Why OpenVINO cannot compute in bf16 here (the service engine's own check), or None when it can."""
    from service.engines.openvino import cpu_capabilities, new_core

    capabilities = cpu_capabilities(new_core("f32"))
    if "BF16" in capabilities:
        return None
    return f"no native bf16 on this CPU (AVX-512 BF16 or AMX); OpenVINO CPU capabilities: {', '.join(capabilities)}"


def _torch(manifest: Manifest, threads: int) -> _Built:
    import torch

    from models import zoo
    from service.engines.torch import TorchEngine

    if threads:
        torch.set_num_threads(threads)
    source = manifest.source
    if source.kind == "demo":
        loaded = zoo.load_demo()
        comparable = bool(source.sha256) and loaded.source.get("sha256") == source.sha256
        what = "demo weights" if comparable else "demo weights (not the exported ones)"
    elif source.kind in ("open_clip", "open_clip_checkpoint") and isinstance(source.architecture, str):
        # Random init of the same architecture: times the same, no download. (`pretrained` is deliberately ignored.)
        loaded = zoo.load_open_clip(source.architecture)
        comparable = False
        what = f"open_clip {source.architecture} random init"
    else:
        raise EngineError(f"no torch model for a {source.kind!r} source")
    engine = TorchEngine(loaded.image_tower, "image", device="cpu", precision="fp32", cuda_graphs=False, name=what)
    note = "" if comparable else f"weights: {what}, not the exported ones (timing only)"
    return _Built(engine, engine.close, f"{engine.description}, {torch.get_num_threads()} threads", comparable, note)


# ----------------------------------------------------------------------------------------------------- run


def model_gflop_per_image(manifest: Manifest, model_dir: Path) -> float | None:
    """Counted from the fp32 image graph; else the ViT-B-32 figure when the manifest says it is one at 224 px."""
    artifact = manifest.find("onnx", "image", "fp32")
    counted = onnx_gflop_per_image(model_dir / artifact.path) if artifact is not None else None
    if counted is not None:
        return counted
    if manifest.source.architecture == "ViT-B-32" and manifest.preprocess.image_size == 224:
        return VIT_B_32_GFLOP_PER_IMAGE
    return None


class _Run:
    def __init__(self, manifest: Manifest, batches: list[int], seconds: float, reps: int, log: Log) -> None:
        self.manifest = manifest
        self.batches = batches
        self.seconds = seconds
        self.reps = reps
        self.log = log
        self.gflop: float | None = None
        size = manifest.preprocess.image_size
        rng = np.random.default_rng(0)
        self.inputs = {b: rng.standard_normal((b, 3, size, size), dtype=np.float32) for b in batches}
        self.probe = np.random.default_rng(1).standard_normal((PARITY_IMAGES, 3, size, size), dtype=np.float32)
        self.reference: np.ndarray | None = None  # ONNX Runtime fp32's embeddings of `probe`
        self.results: list[EngineResult] = []

    def row(self, runtime: str, precision: str, batch: int, rate: float | None, **fields: Any) -> EngineResult:
        result = EngineResult(self.manifest.name, runtime, precision, batch, rate, gflop_per_image=self.gflop, **fields)
        self.results.append(result)
        return result

    def skip(self, runtime: str, precision: str, reason: str) -> None:
        self.log(f"   {runtime} {precision}: skipped: {reason}")
        self.row(runtime, precision, self.batches[0], None, note=f"skipped: {reason}")

    def measure(
        self,
        runtime: str,
        precision: str,
        build: Callable[[], _Built],
        *,
        first_only_unless: Callable[[float], str | None] | None = None,
    ) -> list[EngineResult]:
        """Builds, checks parity, times every batch. `first_only_unless(rate at the first batch)` may return a note
        that stops it after the first batch (fp16 that does not pay)."""
        start = time.perf_counter()
        try:
            built = build()
        except Exception as error:  # not installed, no such graph, unsupported here: one row with the reason
            self.skip(runtime, precision, f"{type(error).__name__}: {error}")
            return []
        rows: list[EngineResult] = []
        try:
            self.log(f"   {runtime} {precision}: {built.description} (built in {time.perf_counter() - start:.1f} s)")
            embeddings = np.asarray(built.encode(self.probe), dtype=np.float32)
            cosine: float | None = None
            if runtime == "onnxruntime" and precision == "fp32":
                self.reference = embeddings
            elif self.reference is not None and built.comparable:
                cosine = float(row_cosines(embeddings, self.reference).min())
            for batch in self.batches:
                pixels = self.inputs[batch]
                rate = rate_per_second(
                    partial(built.encode, pixels), batch, warmup=1, reps=self.reps, seconds=self.seconds
                )
                self.log(f"      batch {batch:>3}: {rate:8.1f} images/s  ({1000 * batch / rate:8.1f} ms/call)")
                stop = first_only_unless(rate) if first_only_unless is not None and batch == self.batches[0] else None
                note = "; ".join(filter(None, (built.note, stop)))
                rows.append(
                    self.row(
                        runtime, precision, batch, rate, note=note, min_cosine_vs_fp32=cosine, engine=built.description
                    )
                )
                if stop:
                    self.log(f"      {stop}")
                    break
            if cosine is not None:
                self.log(f"      min cosine vs onnxruntime fp32 on {PARITY_IMAGES} random images: {cosine:.6f}")
        finally:
            built.close()
            gc.collect()
        return rows

    def rate(self, runtime: str, precision: str, batch: int) -> float | None:
        return next(
            (
                r.images_per_s
                for r in self.results
                if (r.runtime, r.precision, r.batch) == (runtime, precision, batch) and r.measured
            ),
            None,
        )


def run(
    model_dir: str | Path,
    batches: Sequence[int] = DEFAULT_BATCHES,
    seconds: float = DEFAULT_SECONDS,
    *,
    reps: int = DEFAULT_REPS,
    runtimes: Sequence[str] = RUNTIMES,
    threads: int = 0,
    log: Log | None = None,
) -> list[EngineResult]:
    """Images/s of every runtime and precision in `runtimes` for the model in `model_dir`, at each batch size.

    `seconds` is one timing window (median of `reps`); `threads` 0 keeps each runtime's default (as the service's
    CLIPSERVE_INTRA_OP_THREADS=0 does; torch uses its own default). Progress goes to `log` (print, flushed)."""
    unknown = set(runtimes) - set(RUNTIMES)
    if unknown:
        raise ValueError(f"unknown runtime(s) {sorted(unknown)}; expected some of {RUNTIMES}")
    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    say = log or (lambda line: print(line, flush=True))
    bench = _Run(manifest, sorted(set(batches)), seconds, reps, say)
    bench.gflop = model_gflop_per_image(manifest, model_dir)
    gflop = "unknown" if bench.gflop is None else f"{bench.gflop:.3g}"
    say(f"== {manifest.name}: image engines, {manifest.preprocess.image_size} px, {gflop} GFLOP/image")

    def graph(precision: str) -> Path | None:
        artifact = manifest.find("onnx", "image", precision)  # type: ignore[arg-type]
        return None if artifact is None else model_dir / artifact.path

    fp32 = graph("fp32")
    exported = ", ".join(manifest.precisions()) or "none"
    if "onnxruntime" in runtimes:
        for precision in ("fp32", "int8", "fp16"):
            path = graph(precision)
            if path is None:
                bench.skip("onnxruntime", precision, f"no {precision} ONNX image graph (exported: {exported})")
                continue
            first_only_unless = partial(_fp16_note, bench) if precision == "fp16" else None
            bench.measure(
                "onnxruntime",
                precision,
                partial(_onnxruntime, path, precision, threads),
                first_only_unless=first_only_unless,
            )
    if "openvino" in runtimes:
        if fp32 is None:
            bench.skip("openvino", "fp32", f"no fp32 ONNX image graph (exported: {exported})")
        else:
            bench.measure("openvino", "fp32", partial(_openvino, fp32, "fp32", threads))
            try:
                missing = openvino_bf16_missing()
            except Exception as error:  # OpenVINO not installed: the fp32 row already says so
                missing = f"{type(error).__name__}: {error}"
            if missing:
                bench.skip("openvino", "bf16", missing)
            else:
                bench.measure("openvino", "bf16", partial(_openvino, fp32, "bf16", threads))
            _flag_below_gate(bench.results)
    if "torch" in runtimes:
        bench.measure("torch", "fp32", partial(_torch, manifest, threads))
    return bench.results


def _fp16_note(bench: _Run, rate: float) -> str | None:
    """The note that stops fp16 after its first batch, when it is slower there than fp32; None when it pays."""
    fp32_rate = bench.rate("onnxruntime", "fp32", bench.batches[0])
    if fp32_rate is None or rate >= fp32_rate:
        return None
    return (
        f"fp16 does not pay on this CPU: {rate:.1f} vs fp32 {fp32_rate:.1f} images/s at batch {bench.batches[0]}; "
        "larger batches not measured"
    )


def _flag_below_gate(results: list[EngineResult]) -> None:
    """Adds the service's bf16 gate to a bf16 row whose cosine is under it (the service would refuse to start)."""
    from service.engines.openvino import MIN_COSINE

    for i, result in enumerate(results):
        cosine = result.min_cosine_vs_fp32
        if result.precision == "bf16" and cosine is not None and not cosine >= MIN_COSINE:
            note = f"below the service's bf16 gate ({MIN_COSINE}) on random inputs"
            results[i] = EngineResult(**{**result.to_dict(), "note": "; ".join(filter(None, (result.note, note)))})


# ---------------------------------------------------------------------------------------------------- report


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: Sequence[EngineResult], ceiling_gflops: float | None = None) -> str:
    """A Markdown table of the results (and the fraction of `ceiling_gflops` each reaches, when given)."""
    lines = [
        "| model | runtime | precision | batch | images/s | ms/call | GFLOP/s | of matmul peak | min cos vs ORT fp32 "
        "| note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        fraction = r.fraction_of(ceiling_gflops) if ceiling_gflops else None
        lines.append(
            f"| {r.model} | {r.runtime} | {r.precision} | {r.batch} | {_number(r.images_per_s, '.1f')} "
            f"| {_number(r.ms_per_call, '.1f')} | {_number(r.gflops, '.1f')} | {_number(fraction, '.0%')} "
            f"| {_number(r.min_cosine_vs_fp32, '.6f')} | {r.note} |"
        )
    return "\n".join(lines)


def _pairs(repositories: list[Path] | None, models: list[str] | None) -> Iterator[tuple[Path, str]]:
    models = models or [EXPORT_NAME]
    repositories = repositories or [REPOSITORY_DIR]
    if len(repositories) == 1:
        repositories = repositories * len(models)
    return zip(repositories, models, strict=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, action="append", help="model repository (one, or one per --model)")
    parser.add_argument("--model", action="append", help="model name in the repository (repeatable; default: demo)")
    parser.add_argument("--batches", type=int, nargs="+", default=list(DEFAULT_BATCHES))
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="one timing window")
    parser.add_argument("--reps", type=int, default=DEFAULT_REPS, help="timing windows per batch (median)")
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument("--threads", type=int, default=0, help="threads per engine; 0: each runtime's default")
    parser.add_argument("--matmul-seconds", type=float, default=2.0, help="numpy matmul ceiling; 0 skips it")
    parser.add_argument("--json", type=Path, help="also write machine, ceiling and results here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    machine = describe()
    print(
        f"{machine['cpu_model']}, {machine['logical_cores']} logical cores ({machine['affinity_cores']} usable), "
        f"{machine['memory_gib']} GiB, flags {' '.join(machine['cpu_flags']) or '-'}, python {machine['python']}",
        flush=True,
    )
    print("   " + ", ".join(f"{k} {v}" for k, v in machine["packages"].items()), flush=True)
    ceiling = matmul_gflops(args.matmul_seconds) if args.matmul_seconds > 0 else None
    if ceiling is not None:
        print(f"numpy fp32 matmul (2048²): {ceiling:.1f} GFLOP/s", flush=True)
    results: list[EngineResult] = []
    for repository, model in _pairs(args.repository, args.model):
        model_dir = repository / model
        results += run(
            model_dir, args.batches, args.seconds, reps=args.reps, runtimes=args.runtimes, threads=args.threads
        )
    # The ceiling again: a machine shared with other work shows it as a drop (or a rise) between the two.
    after = matmul_gflops(args.matmul_seconds) if args.matmul_seconds > 0 else None
    elapsed = time.perf_counter() - start
    print()
    print(table(results, ceiling))
    if ceiling is not None and after is not None:
        change = after / ceiling - 1
        print(f"\nnumpy fp32 matmul: {ceiling:.1f} GFLOP/s before the engines, {after:.1f} after ({change:+.0%})")
        if abs(change) > 0.15:
            print("the ceiling moved by more than 15 %: other work probably shared the CPU during this run")
    print(f"load average at the end: {load_average()}; total wall time {elapsed:.1f} s", flush=True)
    if args.json:
        payload = {
            "machine": machine,
            "matmul_gflops": ceiling,
            "matmul_gflops_after": after,
            "load_average_after": load_average(),
            "wall_s": elapsed,
            "results": [r.to_dict() for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
