"""TensorRT plans for a model directory, and their record in its manifest.

Plans are built in two places: during `clipserve export --formats tensorrt` (into the staging directory, before
the manifest exists), and on the GPU node that serves the model, by `clipserve build-engines`, the gpu image's
entrypoint, into an exported model that has no plans for that GPU yet. Both record the build the same way: one
`TensorRTBuild` and one plan artifact per tower, so the service's TensorRT engine finds them by GPU family and
TensorRT version.

`ensure_plans` is the second case. When the manifest already records plans that fit (this GPU family and TensorRT
release, the requested precision, a large enough batch), it returns at once and writes nothing, so a read-only
volume with plans built ahead works, and replicas starting together do not queue. Otherwise it takes an exclusive
lock on the model directory, looks again, and builds: replicas that start together on a shared volume build
once, the others wait and then find the plans. The manifest is replaced atomically and re-verified, so a build
killed halfway leaves the model as it was, and the next start builds again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export import tensorrt_build
from models.manifest import (
    MANIFEST_FILE,
    Artifact,
    Manifest,
    TensorRTBuild,
    load_manifest,
    read_manifest,
    sha256_file,
)

LOCK_FILE = ".tensorrt-build.lock"
ROLES = ("image", "text")

Progress = Callable[[str], None]


class PlanDirectoryError(RuntimeError):
    """The model directory cannot take plans (read-only, or not a model)."""


@dataclass(frozen=True)
class TensorRTOptions:
    precision: str = "fp16"
    opt_batch: int = 32  # the service's configured max batch size
    max_batch: int = 64
    timing_cache: Path | None = None
    workspace_bytes: int | None = None


def engine_specs(manifest: Manifest, directory: Path) -> list[tensorrt_build.EngineSpec]:
    """One spec per tower, from the manifest's fp32 ONNX graphs (what TensorRT builds from)."""
    specs = []
    for role in ROLES:
        graph = manifest.find("onnx", role, "fp32")  # type: ignore[arg-type]
        if graph is None or not graph.inputs:
            raise PlanDirectoryError(f"{manifest.name}'s manifest describes no fp32 ONNX {role} graph to build from")
        tensor = graph.inputs[0]
        sample_shape = tuple(int(dim) for dim in tensor.shape[1:])  # the batch axis is the only symbolic one
        specs.append(tensorrt_build.EngineSpec(role, directory / graph.path, tensor.name, sample_shape))
    return specs


def build_and_record(
    directory: Path,
    specs: Sequence[tensorrt_build.EngineSpec],
    options: TensorRTOptions,
    *,
    trt: Any = None,
    gpu: tensorrt_build.GpuInfo | None = None,
) -> tuple[TensorRTBuild, list[Artifact]]:
    """Builds one plan per spec under `directory` and returns the manifest's record of them."""
    build = tensorrt_build.build_engines(
        specs,
        directory,
        precision=options.precision,
        opt_batch=options.opt_batch,
        max_batch=options.max_batch,
        timing_cache_path=options.timing_cache,
        workspace_bytes=options.workspace_bytes,
        trt=trt,
        gpu=gpu,
    )
    record = TensorRTBuild(
        directory=build.directory,
        gpu_name=build.gpu.name,
        compute_capability=build.gpu.compute_capability,
        tensorrt_version=build.tensorrt_version,
        precision=build.precision,  # type: ignore[arg-type]
        min_batch=build.min_batch,
        opt_batch=build.opt_batch,
        max_batch=build.max_batch,
    )
    plans = []
    for engine in build.engines:
        path = Path(engine.plan_path)
        plans.append(
            Artifact(
                path=path.relative_to(Path(directory).resolve()).as_posix(),
                role=engine.role,  # type: ignore[arg-type]
                format="tensorrt",
                precision=build.precision,  # type: ignore[arg-type]
                sha256=sha256_file(path),
                bytes=path.stat().st_size,
            )
        )
    return record, plans


@contextlib.contextmanager
def _exclusive(directory: Path, progress: Progress) -> Iterator[None]:
    try:
        handle = open(directory / LOCK_FILE, "a")  # noqa: SIM115 - held until the build is recorded
    except OSError as error:
        raise PlanDirectoryError(
            f"cannot write TensorRT plans into {directory} ({error.strerror}): plans are built for the GPU that "
            "serves, so the model repository must be a writable volume (mount one at /models), or build them "
            "ahead on a machine with this GPU (`clipserve build-engines`) and ship the directory"
        ) from error
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"another process is building plans in {directory}; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fitting_build(
    manifest: Manifest, gpu: tensorrt_build.GpuInfo, version: str, options: TensorRTOptions
) -> TensorRTBuild | None:
    """The recorded build for this GPU family and TensorRT release, if it is what `options` ask for."""
    for build in manifest.tensorrt:
        if build.runs_on(gpu.compute_capability, version):
            fits = build.precision == options.precision and build.max_batch >= options.max_batch
            return build if fits else None
    return None


def _with_build(manifest: Manifest, record: TensorRTBuild, plans: list[Artifact]) -> Manifest:
    """`manifest` plus one build; an earlier record of the same directory (a stale build) is replaced."""
    prefix = record.directory.rstrip("/") + "/"
    artifacts = [a for a in manifest.artifacts if not a.path.startswith(prefix)] + plans
    builds = [b for b in manifest.tensorrt if b.directory != record.directory] + [record]
    update = {"artifacts": [a.model_dump() for a in artifacts], "tensorrt": [b.model_dump() for b in builds]}
    return Manifest.model_validate({**manifest.model_dump(), **update})


def _move_in(built: Path, target: Path, staging: Path) -> None:
    """Puts the plans in `built` at `target`; plans already there (a stale build) go into `staging` to be deleted."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        os.replace(target, staging / "replaced")
    os.replace(built, target)


def _replace_manifest(directory: Path, manifest: Manifest) -> None:
    temporary = directory / f".{MANIFEST_FILE}.tmp"
    temporary.write_text(manifest.to_json())
    os.replace(temporary, directory / MANIFEST_FILE)  # atomic: readers see the old manifest or the new one


def ensure_plans(
    directory: Path,
    options: TensorRTOptions,
    *,
    trt: Any = None,
    gpu: tensorrt_build.GpuInfo | None = None,
    progress: Progress | None = None,
) -> tuple[TensorRTBuild, bool]:
    """The model's TensorRT build for this GPU and TensorRT release, built and recorded first when missing.

    Returns the build and whether it was built now. Plans of another precision, or for smaller batches than
    `options.max_batch`, are rebuilt in place. TensorRT and the GPU are looked up first, so a machine without
    them fails in a second with the reason.
    """
    progress = progress or (lambda message: None)
    directory = Path(directory)
    trt = trt if trt is not None else tensorrt_build.load_tensorrt()
    gpu = gpu if gpu is not None else tensorrt_build.current_gpu()
    version = str(trt.__version__)
    # Read, not verified: the service verifies every file when it loads the model, and a start that finds its
    # plans should neither write (the volume may be read-only) nor wait for other replicas' checks.
    found = _fitting_build(read_manifest(directory), gpu, version, options)
    if found is not None:
        return found, False
    with _exclusive(directory, progress):
        manifest = load_manifest(directory, verify=True)
        found = _fitting_build(manifest, gpu, version, options)  # another replica may have built them meanwhile
        if found is not None:
            return found, False
        stale = next((b for b in manifest.tensorrt if b.runs_on(gpu.compute_capability, version)), None)
        reason = (
            f"its plans for this GPU are {stale.precision} for batches up to {stale.max_batch}"
            if stale is not None
            else "it has no TensorRT plans for this GPU"
        )
        progress(
            f"building {options.precision} plans of {manifest.name} for {gpu.name} ({gpu.arch}, TensorRT {version}) "
            f"for batches up to {options.max_batch}, because {reason} (minutes, once per GPU family)"
        )
        start = time.perf_counter()
        # Built beside the model, moved in only when complete: a rebuild must not overwrite the recorded plans
        # of a stale build until the new ones exist, or a failed build would leave files the manifest disowns.
        staging = directory / f".tensorrt-staging-{uuid.uuid4().hex[:8]}"
        try:
            specs = engine_specs(manifest, directory)
            record, plans = build_and_record(staging, specs, options, trt=trt, gpu=gpu)
            _move_in(staging / record.directory, directory / record.directory, staging)
            _replace_manifest(directory, _with_build(manifest, record, plans))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        load_manifest(directory, verify=True)
        progress(f"built {record.directory} in {time.perf_counter() - start:.0f} s")
        return record, True
