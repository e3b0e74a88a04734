"""Build TensorRT engines (serialized plans) from the exported ONNX graphs.

A TensorRT plan is not a portable model format. The builder times candidate kernels on the GPU it runs on and
bakes the winners, compiled for that GPU's compute capability, into the plan; the plan's layout is also tied to
the exact TensorRT release that wrote it. A plan built on an H100 (sm90) will not deserialize on an L4 (sm89),
and a plan from TensorRT 10.3 is refused by the 10.7 runtime. So engines live in one directory per GPU family
and TensorRT version, ``tensorrt/<sm-arch>-trt<version>/`` (see `engine_directory`), next to the ONNX graphs they
came from, and the manifest records which GPU and TensorRT version each directory is for, so a loader can pick
the one directory whose compute capability and TensorRT version match its own (or none, and use ONNX).

The code follows NVIDIA's documented TensorRT 10 Python API: ``Builder``, ``create_network``, ``OnnxParser``,
``IBuilderConfig`` with one optimization profile over the batch axis, a persistent timing cache, and
``build_serialized_network``. Nothing here runs without an NVIDIA GPU and the ``tensorrt`` wheel
(``pip install 'clipserve[gpu]'``); every function that touches TensorRT takes the module as an argument so the
logic can be exercised against a fake.

Precision: TensorRT 10 builds "weakly typed" networks in which ``BuilderFlag.FP16`` / ``BuilderFlag.BF16`` allow
(not force) reduced-precision kernels. NVIDIA deprecated those flags in 10.12 and removed them in TensorRT 11,
which only builds strongly typed networks; with TensorRT 11 build the fp32 engine from a graph that is already
reduced-precision (the ``onnx-fp16`` export) instead.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.extras import load_tensorrt

__all__ = [
    "PRECISIONS",
    "BuiltEngine",
    "EngineBuild",
    "EngineBuildError",
    "EngineSpec",
    "GpuInfo",
    "NoGpuError",
    "ProfileShapes",
    "build_engine",
    "build_engines",
    "current_gpu",
    "engine_directory",
    "precision_flags",
    "profile_shapes",
]

log = logging.getLogger("clipserve.export")

PRECISIONS = ("fp32", "fp16", "bf16")

# BF16 tensor-core math arrived with Ampere (sm80); older GPUs have no bf16 kernels for TensorRT to choose.
BF16_MIN_COMPUTE_CAPABILITY = (8, 0)

_COMPUTE_CAPABILITY = re.compile(r"^(\d+)\.(\d+)$")


class NoGpuError(RuntimeError):
    """No CUDA device is visible, so there is nothing to build engines for."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX graph or could not build an engine from it."""


@dataclass(frozen=True)
class GpuInfo:
    """The GPU an engine is built for; its compute capability decides which machines can load the plan."""

    name: str  # "NVIDIA H200"
    compute_capability: str  # "9.0"

    def __post_init__(self) -> None:
        if not _COMPUTE_CAPABILITY.match(self.compute_capability):
            raise ValueError(f"compute capability must look like '9.0', got {self.compute_capability!r}")

    @property
    def capability(self) -> tuple[int, int]:
        match = _COMPUTE_CAPABILITY.match(self.compute_capability)
        assert match is not None  # checked in __post_init__
        return int(match.group(1)), int(match.group(2))

    @property
    def arch(self) -> str:
        """The CUDA architecture name, "sm90" for compute capability 9.0, "sm86" for 8.6."""
        major, minor = self.capability
        return f"sm{major}{minor}"


_NO_GPU_HINT = (
    "TensorRT engines are built on, and only run on, the NVIDIA GPU family they are built for; run the TensorRT "
    "build on a GPU machine, or use the ONNX formats (onnx, onnx-fp16, onnx-int8), which need no GPU."
)


def current_gpu(device: int = 0) -> GpuInfo:
    """Describe CUDA device `device` through NVIDIA's CUDA Python bindings, else through torch.

    The GPU image has cuda-bindings (the TensorRT engine's dependency) and no torch; an export machine may have
    torch only.
    """
    try:
        from cuda.bindings import runtime
    except (ImportError, OSError):
        return _current_gpu_from_torch(device)
    ok = runtime.cudaError_t.cudaSuccess
    error, count = runtime.cudaGetDeviceCount()
    if error != ok:
        _, reason = runtime.cudaGetErrorString(error)
        reason = reason.decode() if isinstance(reason, bytes) else str(reason)
        raise NoGpuError(f"No CUDA GPU is visible (CUDA runtime: {reason}). {_NO_GPU_HINT}")
    if count <= device:
        raise NoGpuError(f"CUDA device {device} does not exist ({count} visible). {_NO_GPU_HINT}")
    error, properties = runtime.cudaGetDeviceProperties(device)
    if error != ok:
        raise NoGpuError(f"cudaGetDeviceProperties({device}) failed ({error}). {_NO_GPU_HINT}")
    name = properties.name  # char[256] on the C side: bytes with trailing NULs in the bindings
    name = name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)
    return GpuInfo(name=name, compute_capability=f"{properties.major}.{properties.minor}")


def _current_gpu_from_torch(device: int) -> GpuInfo:
    import torch

    if not torch.cuda.is_available():
        raise NoGpuError(f"No CUDA GPU is visible (torch.cuda.is_available() is False). {_NO_GPU_HINT}")
    major, minor = torch.cuda.get_device_capability(device)
    return GpuInfo(name=torch.cuda.get_device_name(device), compute_capability=f"{major}.{minor}")


def engine_directory(gpu: GpuInfo, tensorrt_version: str) -> str:
    """Relative POSIX directory for plans built on `gpu` with `tensorrt_version`: ``tensorrt/sm90-trt10.7.0``."""
    if not tensorrt_version or "/" in tensorrt_version or "\\" in tensorrt_version:
        raise ValueError(f"invalid TensorRT version {tensorrt_version!r}")
    return f"tensorrt/{gpu.arch}-trt{tensorrt_version}"


@dataclass(frozen=True)
class ProfileShapes:
    """Input shapes, batch axis first, for one TensorRT optimization profile."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def profile_shapes(
    sample_shape: tuple[int, ...], *, min_batch: int = 1, opt_batch: int, max_batch: int
) -> ProfileShapes:
    """Shapes for a profile that varies only the batch axis; `sample_shape` excludes it, e.g. (3, 224, 224)."""
    if any(not isinstance(dim, int) or dim < 1 for dim in sample_shape):
        raise ValueError(f"sample shape must be positive integers without the batch axis, got {sample_shape!r}")
    if min_batch < 1:
        raise ValueError(f"min_batch must be at least 1, got {min_batch}")
    if opt_batch < min_batch:
        raise ValueError(f"opt_batch ({opt_batch}) must be >= min_batch ({min_batch})")
    if max_batch < opt_batch:
        raise ValueError(f"max_batch ({max_batch}) must be >= opt_batch ({opt_batch})")
    sample = tuple(sample_shape)
    return ProfileShapes(min=(min_batch, *sample), opt=(opt_batch, *sample), max=(max_batch, *sample))


def precision_flags(trt: Any, builder: Any, precision: str, gpu: GpuInfo | None = None) -> list[Any]:
    """The ``trt.BuilderFlag`` members that let TensorRT pick kernels of `precision`.

    fp32 sets nothing. TF32 is on by default in TensorRT, so "fp32" engines may still use TF32 tensor cores on
    Ampere and newer. fp16 needs a GPU with fast native fp16 (``builder.platform_has_fast_fp16``); bf16 an Ampere or
    newer GPU (compute capability >= 8.0): pass `gpu` to have that checked here rather than fail deep in the build.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown TensorRT precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return []
    name = precision.upper()
    flag = getattr(trt.BuilderFlag, name, None)
    if flag is None:
        raise ValueError(
            f"TensorRT {trt.__version__} has no BuilderFlag.{name} (removed in TensorRT 11, which only builds "
            "strongly typed networks); build precision 'fp32' from the onnx-fp16 graph instead"
        )
    if precision == "fp16" and not builder.platform_has_fast_fp16:
        raise ValueError(
            "precision 'fp16' requested but this GPU has no fast native fp16 "
            "(builder.platform_has_fast_fp16 is False); build with precision 'fp32'"
        )
    if precision == "bf16" and gpu is not None and gpu.capability < BF16_MIN_COMPUTE_CAPABILITY:
        raise ValueError(
            f"precision 'bf16' needs an Ampere or newer GPU (compute capability >= 8.0); "
            f"{gpu.name} has compute capability {gpu.compute_capability}. Use precision 'fp16'"
        )
    return [flag]


@dataclass(frozen=True)
class EngineSpec:
    """One ONNX graph to turn into an engine."""

    role: str  # "image" | "text"
    onnx_path: Path
    input_name: str  # "pixels" | "token_ids"
    sample_shape: tuple[int, ...]  # without the batch axis


@dataclass(frozen=True)
class BuiltEngine:
    role: str
    plan_path: Path  # absolute
    build_seconds: float
    profile: ProfileShapes


@dataclass(frozen=True)
class EngineBuild:
    """Everything the manifest records about one set of engines."""

    directory: str  # relative to the model directory, from engine_directory()
    gpu: GpuInfo
    tensorrt_version: str
    precision: str
    min_batch: int
    opt_batch: int
    max_batch: int
    engines: tuple[BuiltEngine, ...]


def _write_atomically(path: Path, data: Any) -> None:
    # A killed build must not leave a truncated plan or cache that a later run (or the server) would try to load.
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as file:
        file.write(data)
    os.replace(tmp, path)


def _attach_timing_cache(config: Any, timing_cache_path: Path) -> None:
    data = timing_cache_path.read_bytes() if timing_cache_path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        if data:
            log.info("using timing cache %s (%d bytes)", timing_cache_path, len(data))
        return
    # The cache header records the device it was timed on, and TensorRT refuses another device's cache when
    # ignore_mismatch is False (timings from another GPU would pick wrong kernels). Start fresh; the file is
    # overwritten with this GPU's cache after the build.
    log.warning("timing cache %s is unreadable or from another GPU; starting an empty one", timing_cache_path)
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise EngineBuildError(f"TensorRT refused an empty timing cache for {timing_cache_path}")


def build_engine(
    trt: Any,
    spec: EngineSpec,
    plan_path: Path,
    *,
    precision: str,
    shapes: ProfileShapes,
    timing_cache_path: Path | None,
    workspace_bytes: int | None = None,
    gpu: GpuInfo | None = None,
    logger: Any = None,
) -> BuiltEngine:
    """Parse `spec.onnx_path`, build an engine with one batch profile, write the plan to `plan_path`.

    With `timing_cache_path`, kernel timings are loaded from that file when it exists and saved back after the
    build, so rebuilding (or building the second encoder) skips re-timing tactics already measured. `logger` is a
    ``trt.ILogger``; by default a ``trt.Logger`` at WARNING.
    """
    onnx_path = Path(spec.onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX graph for the {spec.role} engine not found: {onnx_path}")
    if shapes.min[1:] != tuple(spec.sample_shape):
        raise ValueError(
            f"profile shapes {shapes.min} do not match the {spec.role} sample shape {tuple(spec.sample_shape)}"
        )

    start = time.perf_counter()
    trt_logger = logger if logger is not None else trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    # Resolve the precision before the (slow) parse so an unsupported request fails immediately.
    flags = precision_flags(trt, builder, precision, gpu)

    # TensorRT 10 networks are always explicit-batch; no flags keeps them weakly typed, so the precision flags apply.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt_logger)
    log.info("parsing %s for the %s engine", onnx_path, spec.role)
    # parse_from_file (not parse(bytes)) so the parser can find weights stored as external data next to the graph.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        details = "\n  ".join(errors) if errors else "(the parser reported no details)"
        raise EngineBuildError(f"TensorRT could not parse {onnx_path}:\n  {details}")

    input_names = [network.get_input(i).name for i in range(network.num_inputs)]
    if spec.input_name not in input_names:
        raise EngineBuildError(
            f"{onnx_path} has no input named {spec.input_name!r} for the {spec.role} engine; inputs: {input_names}"
        )

    config = builder.create_builder_config()
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    for flag in flags:
        config.set_flag(flag)

    # Only the batch axis is dynamic; TensorRT tunes kernels for `opt` and accepts any batch in [min, max].
    profile = builder.create_optimization_profile()
    profile.set_shape(spec.input_name, shapes.min, shapes.opt, shapes.max)
    config.add_optimization_profile(profile)

    if timing_cache_path is not None:
        _attach_timing_cache(config, timing_cache_path)

    log.info(
        "building the %s engine (%s, batch %d..%d, optimised for %d); this can take minutes",
        spec.role,
        precision,
        shapes.min[0],
        shapes.max[0],
        shapes.opt[0],
    )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(
            f"TensorRT failed to build the {spec.role} engine from {onnx_path}; the TensorRT log above says why"
        )

    plan_path = Path(plan_path)
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(plan_path, serialized)
    if timing_cache_path is not None:
        timing_cache_path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(timing_cache_path, config.get_timing_cache().serialize())

    seconds = time.perf_counter() - start
    log.info("wrote %s (%d bytes) in %.1f s", plan_path, plan_path.stat().st_size, seconds)
    return BuiltEngine(role=spec.role, plan_path=plan_path.resolve(), build_seconds=seconds, profile=shapes)


def build_engines(
    specs: Sequence[EngineSpec],
    model_dir: Path,
    *,
    precision: str = "fp16",
    min_batch: int = 1,
    opt_batch: int,
    max_batch: int,
    timing_cache_path: Path | None = None,
    workspace_bytes: int | None = None,
    trt: Any = None,
    gpu: GpuInfo | None = None,
) -> EngineBuild:
    """Build one plan per spec into ``model_dir / engine_directory(gpu, trt.__version__) / f"{role}.plan"``."""
    if not specs:
        raise ValueError("no engine specs given")
    roles = [spec.role for spec in specs]
    if len(set(roles)) != len(roles):
        raise ValueError(f"engine roles must be unique, got {roles}")
    # Validate every profile before loading TensorRT or touching the GPU, so a typo fails in milliseconds.
    shapes = {
        spec.role: profile_shapes(spec.sample_shape, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch)
        for spec in specs
    }
    if precision not in PRECISIONS:
        raise ValueError(f"unknown TensorRT precision {precision!r}; expected one of {', '.join(PRECISIONS)}")

    trt = trt if trt is not None else load_tensorrt()
    gpu = gpu if gpu is not None else current_gpu()
    tensorrt_version = str(trt.__version__)
    directory = engine_directory(gpu, tensorrt_version)
    out_dir = Path(model_dir) / directory
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("building %s TensorRT engines for %s (%s) into %s", precision, gpu.name, gpu.arch, out_dir)

    trt_logger = trt.Logger(trt.Logger.WARNING)
    engines = tuple(
        build_engine(
            trt,
            spec,
            out_dir / f"{spec.role}.plan",
            precision=precision,
            shapes=shapes[spec.role],
            timing_cache_path=timing_cache_path,
            workspace_bytes=workspace_bytes,
            gpu=gpu,
            logger=trt_logger,
        )
        for spec in specs
    )
    return EngineBuild(
        directory=directory,
        gpu=gpu,
        tensorrt_version=tensorrt_version,
        precision=precision,
        min_batch=min_batch,
        opt_batch=opt_batch,
        max_batch=max_batch,
        engines=engines,
    )
