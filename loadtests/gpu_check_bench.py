"""The GPU check's measurements of single components: the similarity kernel, the torch engine, preprocessing.

Each section runs in its own process (loadtests.gpu_check starts it), so a CUDA error that poisons the process's
context, or a hang, costs only that section. Timings are medians after warm-ups; every call timed here blocks
until its result is on the host, so wall-clock time is the honest end-to-end number. Device-only kernel times
come from torch's profiler (CUPTI), which sees every kernel in the process, the driver API's launches too.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.gpu_check_config import (
    Config,
    EngineRun,
    Recorder,
    SectionSkipped,
    measure,
    median_call_us,
)
from loadtests.timing import rate_per_second
from models.scoring import Scoring, cosines, ranked

CLIP = Scoring(100.0, None, "softmax")


def _torch_dtype(torch: Any, dtype: str) -> Any:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def unit_rows(torch: Any, rows: int, dim: int, seed: int, device: str) -> Any:
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(rows, dim, device=device, generator=generator), dim=1)


KERNEL_PREFIX = "clipserve_"  # every entry point of service/kernels/similarity.cu


def split_kernel_events(events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Chrome-trace kernel events -> (our path's, torch's).

    Our path is more than the clipserve_ kernels: its GEMM is cuBLAS's by default (names like nvjet_* or
    sm90_xmma_*, as torch's own matmul), launched on the driver's stream. So every kernel on a stream that ran a
    clipserve_ kernel is ours, the rest torch's (its current stream); by name only where the trace has no stream.
    """
    kernels = [event for event in events if event.get("cat") == "kernel"]

    def stream(event: dict[str, Any]) -> Any:
        return (event.get("args") or {}).get("stream")

    named = [event for event in kernels if str(event.get("name", "")).startswith(KERNEL_PREFIX)]
    streams = {stream(event) for event in named}
    if named and None not in streams:
        ours = [event for event in kernels if stream(event) in streams]
        return ours, [event for event in kernels if stream(event) not in streams]
    return named, [event for event in kernels if not str(event.get("name", "")).startswith(KERNEL_PREFIX)]


def device_kernel_us(kernel_path: Callable[[], Any], torch_path: Callable[[], Any], reps: int) -> dict[str, Any]:
    """GPU time per call of the kernels each path launches (copies excluded), from one profiler trace of `reps`
    calls of each. One trace, not two, halves the profiler's own start-up cost; the paths' kernels are told
    apart by stream (split_kernel_events)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        for call in (kernel_path, torch_path):
            for _ in range(reps):
                call()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as directory:
        trace = Path(directory) / "trace.json"
        profiler.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text()).get("traceEvents", [])
    ours, theirs = split_kernel_events(events)
    if not ours or not theirs:
        raise RuntimeError(f"the profiler recorded {len(ours)} kernels of our path and {len(theirs)} of torch's")
    return {
        "kernel_device_us": sum(float(event.get("dur", 0)) for event in ours) / reps,
        "torch_device_us": sum(float(event.get("dur", 0)) for event in theirs) / reps,
        "kernel_kernels": sorted({str(event.get("name", ""))[:60] for event in ours}),
        "torch_kernels": sorted({str(event.get("name", ""))[:60] for event in theirs}),
    }


# ------------------------------------------------------------------------------------------------ (a) the kernel


def kernel_section(config: Config, recorder: Recorder) -> None:
    """CudaSimilarity.rank against torch (matmul + softmax + topk, then .cpu()) and the numpy CPU path."""
    import torch

    from service.gpu.similarity import CudaSimilarity, LabelSet

    cuda = config.device == "cuda"
    similarity = single = own_gemm = None
    if cuda:
        similarity = CudaSimilarity(fatbin=config.fatbin, label_cache_bytes=4 << 30)
        # Beside the default (GEMM: cuBLAS where it loads, with label residuals), so the trade-offs are on record:
        # the rounded labels alone (half the GEMM work, less parity with the CPU path), and the kernel's own WMMA
        # GEMM instead of cuBLAS.
        single = CudaSimilarity(fatbin=config.fatbin, label_cache_bytes=4 << 30, label_residuals=False)
        own_gemm = CudaSimilarity(fatbin=config.fatbin, label_cache_bytes=4 << 30, gemm="kernel")
        recorder.set("gemm", similarity.gemm)
    else:
        recorder.set("kernel_skipped", "no CUDA GPU here: the kernel's columns are not measured")
    recorder.set(
        "method",
        {
            "scoring": "softmax, logit scale 100",
            "k": config.top_k,
            "warmup": config.warmup,
            "reps": config.reps,
            "profile_reps": config.profile_reps,
            "numpy_max_scores": config.numpy_max_scores,
        },
    )
    for dim in config.dims:
        for count in config.label_counts:
            labels = unit_rows(torch, count, dim, seed=count * 13 + dim, device=config.device)
            label_set = LabelSet(f"gpu-check-{count}-{dim}", labels.cpu().numpy())
            for rows in config.batches:
                for dtype in (config.dtype, *config.extra_dtypes.get((rows, count, dim), ())):
                    row = _kernel_row(torch, config, (similarity, single, own_gemm), labels, label_set, rows, dtype)
                    recorder.row("rows", row)
                    print(
                        f"    kernel B={rows} C={count} D={dim} {dtype}: kernel {_us(row.get('kernel_us'))}, "
                        f"torch {_us(row.get('torch_us'))}, numpy {_us(row.get('numpy_us'))}",
                        flush=True,
                    )
            for engine in (similarity, single, own_gemm):
                if engine is not None:
                    engine.labels.forget(label_set.key)  # the next label set gets the memory
            del labels
    for engine in (similarity, single, own_gemm):
        if engine is not None:
            engine.close()


def _max_probability_difference(engine: Any, images: Any, label_set: Any, k: int, every: np.ndarray) -> float:
    result = engine.rank(images, label_set, CLIP, k)
    return float(np.abs(result.probabilities - np.take_along_axis(every, result.indices, axis=1)).max())


def _us(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} µs"


def _kernel_row(
    torch: Any, config: Config, engines: tuple[Any, Any, Any], labels: Any, label_set: Any, rows: int, dtype: str
) -> dict[str, Any]:
    similarity, single, own_gemm = engines
    from service.gpu.device_array import DeviceArray

    count, dim = label_set.matrix.shape
    k = min(config.top_k, count)
    row: dict[str, Any] = {"B": rows, "C": count, "D": dim, "dtype": dtype, "k": k}
    typed = _torch_dtype(torch, dtype)
    images = unit_rows(torch, rows, dim, seed=rows * 7 + count, device=config.device).to(typed).contiguous()
    typed_labels = labels.to(typed)
    scale = CLIP.logit_scale

    def torch_path() -> tuple[Any, Any]:
        top = (scale * images @ typed_labels.T).softmax(-1).topk(k)
        return top.values.cpu(), top.indices.cpu()

    timed = partial(median_call_us, warmup=config.warmup, reps=config.reps, seconds=config.rep_seconds)
    measure(row, "torch_us", partial(timed, torch_path))
    if similarity is not None:
        torch.cuda.synchronize()  # the kernel runs on the driver's own stream: the inputs must be complete
        array = DeviceArray.from_torch(images)

        def kernel_path() -> Any:
            return similarity.rank(array, label_set, CLIP, k)

        measure(row, "kernel_us", partial(timed, kernel_path))
        device = measure(row, "device", partial(device_kernel_us, kernel_path, torch_path, config.profile_reps))
        row["kernel_device_us"] = device["kernel_device_us"] if device else None
        row["torch_device_us"] = device["torch_device_us"] if device else None
        measure(
            row, "top1_agreement", lambda: float(np.mean(kernel_path().indices[:, 0] == torch_path()[1][:, 0].numpy()))
        )
        if dtype != "float32" and single is not None:

            def single_path() -> Any:
                return single.rank(array, label_set, CLIP, k)

            measure(row, "kernel_single_us", partial(timed, single_path))
        if own_gemm is not None and own_gemm.gemm != similarity.gemm:

            def own_gemm_path() -> Any:
                return own_gemm.rank(array, label_set, CLIP, k)

            measure(row, "kernel_own_gemm_us", partial(timed, own_gemm_path))
    if rows * count <= config.numpy_max_scores:
        host_images = images.float().cpu().numpy()
        host_labels = label_set.matrix

        def numpy_path() -> np.ndarray:
            probabilities = CLIP.probabilities(cosines(host_images, host_labels))
            return np.take_along_axis(probabilities, ranked(probabilities, k), axis=1)

        measure(row, "numpy_us", lambda: median_call_us(numpy_path, warmup=0, reps=5, seconds=1.5, min_reps=1))
        if similarity is not None:
            # Parity with the CPU path on the same embeddings: the largest probability difference, by label
            # (the top-k of each side, compared on the labels both picked).
            every = CLIP.probabilities(cosines(host_images, host_labels))
            for column, engine in (("max_dp", similarity), ("max_dp_single", single)):
                if engine is not None and (column == "max_dp" or dtype != "float32"):
                    measure(row, column, partial(_max_probability_difference, engine, array, label_set, k, every))
    else:
        row["numpy_us"] = None
        row.setdefault("skipped", {})["numpy_us"] = f"B×C above {config.numpy_max_scores:,}"
    if row.get("kernel_us") and row.get("torch_us"):
        row["speedup"] = row["torch_us"] / row["kernel_us"]
    if row.get("kernel_device_us") and row.get("torch_device_us"):
        row["device_speedup"] = row["torch_device_us"] / row["kernel_device_us"]
    return row


# ------------------------------------------------------------------------------------------------ (b) the engine


def count_flops(tower: Any, size: int) -> float:
    """FLOPs of one image through the tower, counted by torch's FlopCounterMode at batch 2.

    nn.MultiheadAttention's inference fast path is one fused op the counter does not know (it would miss the
    attention projections, a third of a ViT's FLOPs), so it is switched off while counting.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        pixels = torch.zeros(2, 3, size, size, device=next(tower.parameters()).device)
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            tower(pixels)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    return counter.get_total_flops() / 2


def engine_section(config: Config, recorder: Recorder) -> None:
    """Random-init open_clip image tower in TorchEngine: images/s per precision, graphs and batch size."""
    import torch

    from models import zoo
    from service.engines.torch import TorchEngine

    loaded = zoo.load_open_clip(config.engine_arch, None)
    tower, size = loaded.image_tower, loaded.preprocess.image_size
    recorder.set("model", {"architecture": config.engine_arch, "image_size": size, "embed_dim": loaded.embed_dim})
    flops = None
    try:
        flops = count_flops(tower, size)
        recorder.set("flops_per_image", flops)
    except Exception as error:  # the roofline column is then left empty, the throughput still measured
        recorder.note(f"FLOP count failed: {type(error).__name__}: {error}")
    recorder.set("peak_tflops", config.peak_tflops)
    recorder.set(
        "method",
        {
            "reps": config.engine_reps,
            "seconds_per_rep": config.engine_seconds,
            "call": "embed_on_device (synchronises)" if config.device == "cuda" else "__call__",
        },
    )
    for run in config.engine_runs:
        if config.device != "cuda" and (run.precision == "fp16" or run.cuda_graphs):
            recorder.note(f"{run.precision} graphs={run.cuda_graphs} skipped: needs a CUDA GPU")
            continue
        _engine_run(torch, TorchEngine, tower, size, flops, config, run, recorder)


def _engine_run(
    torch: Any,
    engine_class: Any,
    tower: Any,
    size: int,
    flops: float | None,
    config: Config,
    run: EngineRun,
    recorder: Recorder,
) -> None:
    # Engines convert the (shared) tower in place, so one engine at a time, closed before the next.
    engine = engine_class(
        tower,
        "image",
        device=config.device,
        precision=run.precision,
        cuda_graphs=run.cuda_graphs,
        max_batch_size=max(run.batches),
    )
    try:
        for batch in run.batches:
            row: dict[str, Any] = {
                "precision": run.precision,
                "cuda_graphs": run.cuda_graphs,
                "batch": batch,
                "input": run.input,
            }
            generator = torch.Generator().manual_seed(batch)
            pixels = torch.randn(batch, 3, size, size, generator=generator)
            inputs = pixels.numpy() if run.input == "host" else pixels.to(config.device)
            call = partial(engine.embed_on_device if config.device == "cuda" else engine, inputs)
            rate = measure(
                row,
                "images_s",
                partial(rate_per_second, call, batch, warmup=3, reps=config.engine_reps, seconds=config.engine_seconds),
            )
            if rate:
                row["ms_per_batch"] = batch / rate * 1000
                if flops:
                    row["tflops"] = rate * flops / 1e12
                    row["roofline_fraction"] = row["tflops"] / config.peak_tflops
            recorder.row("rows", row)
            print(
                f"    engine {run.precision} graphs={run.cuda_graphs} batch {batch} ({run.input} input): "
                f"{'n/a' if rate is None else f'{rate:,.0f}'} images/s",
                flush=True,
            )
    finally:
        engine.close()


# ------------------------------------------------------------------------------------------------ (c) preprocessing


def preprocess_section(config: Config, recorder: Recorder) -> None:
    """loadtests.preprocess_parity on this device: pixel and embedding differences, images/s both ways."""
    from loadtests import preprocess_parity

    if not hasattr(preprocess_parity, "measure"):
        raise SectionSkipped("loadtests.preprocess_parity has no measure() yet")
    arguments = dict(config.preprocess)
    recorder.set("arguments", {**arguments, "device": config.device})
    # Rows recorded as they finish: a section killed at its time limit keeps those (set below replaces them whole).
    rows = preprocess_parity.measure(config.device, on_row=partial(recorder.row, "rows"), **arguments)
    recorder.set("rows", rows)
    recorder.set("table", preprocess_parity.markdown_table(rows))
