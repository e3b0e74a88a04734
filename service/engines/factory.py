"""Choose and build the two encoders' engines from the settings and the model's manifest, and warm them up.

The one place that knows every runtime: each backend module is imported only when chosen, so the torch
and TensorRT engines cost nothing (and need nothing installed) unless asked for.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.manifest import Artifact, Manifest, TensorRTBuild
from service.engines.base import Engine, EngineError
from service.settings import Settings

log = logging.getLogger("clipserve.engines")

ROLES = ("image", "text")
TENSORRT_INPUTS = {"image": "pixels", "text": "token_ids"}  # the names export/tensorrt_build.py profiles
_UNIT_NORM_TOLERANCE = 1e-2  # fp16 and int8 graphs normalise at reduced precision


@dataclass(frozen=True)
class EnginePair:
    image: Engine
    text: Engine

    def close(self) -> None:
        self.image.close()
        self.text.close()


def build_engines(settings: Settings, manifest: Manifest, model_dir: Path) -> EnginePair:
    """The image and text engines `settings.engine` names, for the model in `model_dir`."""
    image: Engine
    text: Engine
    match settings.engine:
        case "onnxruntime":
            try:
                from service.engines.onnxruntime import OnnxRuntimeEngine
            except ImportError as error:
                if error.name != "onnxruntime":
                    raise
                # Neither ONNX Runtime build is a base dependency (they overwrite each other): an install
                # without the `cpu` or `gpu` extra has none.
                raise EngineError(
                    "ONNX Runtime is not installed: install clipserve with the extra for this machine, "
                    "pip install 'clipserve[cpu]' (or 'clipserve[gpu]' on NVIDIA GPU nodes)"
                ) from error

            image, text = (
                OnnxRuntimeEngine(
                    Path(model_dir) / _onnx_graph(manifest, role, settings.precision).path,
                    role,
                    precision=settings.precision,
                    providers=settings.onnx_providers,
                    intra_op_threads=settings.intra_op_threads,
                    spin=settings.intra_op_spinning,
                )
                for role in ROLES
            )
        case "tensorrt":
            from service.engines import cuda_runtime
            from service.engines.tensorrt import TensorRTEngine, require_tensorrt, select_build

            tensorrt_version = str(require_tensorrt().__version__)  # first: without TensorRT nothing else matters
            build = select_build(manifest, cuda_runtime.compute_capability(), tensorrt_version)
            if settings.max_batch_size > build.max_batch:
                log.warning(
                    "CLIPSERVE_MAX_BATCH_SIZE=%d exceeds the TensorRT profile's max batch %d, which caps image "
                    "batches instead",
                    settings.max_batch_size,
                    build.max_batch,
                )
            image, text = (
                TensorRTEngine(
                    Path(model_dir) / _tensorrt_plan(manifest, build, role).path,
                    role,
                    input_name=TENSORRT_INPUTS[role],
                    max_batch_size=build.max_batch,
                    precision=build.precision,
                )
                for role in ROLES
            )
        case "openvino":
            image, text = _openvino_engines(settings, manifest, Path(model_dir))
        case "torch":
            from service.engines.torch import load_torch_engines

            image, text = load_torch_engines(manifest, settings)
        case other:
            raise EngineError(f"unknown engine {other!r}; expected onnxruntime, tensorrt, torch or openvino")
    log.info("engines: image %s; text %s", image.description, text.description)
    return EnginePair(image=image, text=text)


def _openvino_engines(settings: Settings, manifest: Manifest, model_dir: Path) -> tuple[Engine, Engine]:
    from service.engines.openvino import OpenVinoEngine, check_parity, new_core

    # OpenVINO lowers precision itself, from the fp32 graphs; the exported fp16/int8 ones would lower it twice.
    if settings.precision != "fp32":
        raise EngineError(
            f"CLIPSERVE_ENGINE=openvino compiles the fp32 graphs, but CLIPSERVE_PRECISION={settings.precision}; "
            "unset it and choose what OpenVINO computes in with CLIPSERVE_OPENVINO_PRECISION (f32 or bf16)"
        )
    core = new_core(settings.openvino_precision)  # first: refuses bf16 on a CPU without it before compiling anything
    paths = {role: model_dir / _onnx_graph(manifest, role, "fp32").path for role in ROLES}
    image, text = (
        OpenVinoEngine(
            paths[role], role, precision=settings.openvino_precision, core=core, threads=settings.intra_op_threads
        )
        for role in ROLES
    )
    if image.precision != "fp32":
        try:
            check_parity(image, text, paths, manifest, model_dir, threads=settings.intra_op_threads)
        except BaseException:
            image.close()
            text.close()
            raise
    return image, text


def _onnx_graph(manifest: Manifest, role: str, precision: str) -> Artifact:
    artifact = manifest.find("onnx", role, precision)  # type: ignore[arg-type]
    if artifact is None:
        raise EngineError(
            f"CLIPSERVE_PRECISION={precision}, but {manifest.name} has no {precision} ONNX graphs; exported "
            f"precisions: {manifest.precisions()} (re-export with that format, or pick one of these)"
        )
    return artifact


def _tensorrt_plan(manifest: Manifest, build: TensorRTBuild, role: str) -> Artifact:
    prefix = build.directory.rstrip("/") + "/"
    for artifact in manifest.artifacts:
        if artifact.format == "tensorrt" and artifact.role == role and artifact.path.startswith(prefix):
            return artifact
    raise EngineError(f"the manifest of {manifest.name} lists no {role} plan under {build.directory}/; re-export")


def warm_up(pair: EnginePair, manifest: Manifest) -> None:
    """One call per engine on a placeholder input; EngineError unless each gives one finite unit vector."""
    size, tokens = manifest.preprocess.image_size, manifest.tokenizer
    pixels = np.zeros((1, 3, size, size), dtype=np.float32)
    token_ids = np.full((1, tokens.context_length), tokens.pad_token_id, dtype=np.int64)
    token_ids[0, :2] = tokens.sot_token_id, tokens.eot_token_id  # the empty text
    for engine, inputs in ((pair.image, pixels), (pair.text, token_ids)):
        start = time.perf_counter()
        try:
            output = np.asarray(engine(inputs))
        except EngineError:
            raise
        except Exception as error:  # any runtime's failure on its first call means the engine is unusable
            raise EngineError(f"warm-up of {engine.description} failed: {error}") from error
        if output.shape != (1, manifest.embed_dim):
            raise EngineError(
                f"warm-up of {engine.description}: output shape {output.shape}, expected (1, {manifest.embed_dim})"
            )
        norm = float(np.linalg.norm(output.astype(np.float64)))
        if not np.isfinite(output).all() or abs(norm - 1.0) > _UNIT_NORM_TOLERANCE:
            raise EngineError(f"warm-up of {engine.description}: expected a finite unit vector, got norm {norm:.4g}")
        log.info("warmed up %s in %.1f ms", engine.description, (time.perf_counter() - start) * 1e3)
