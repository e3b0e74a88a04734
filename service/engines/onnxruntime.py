"""ONNX Runtime engine: one exported graph (image or text tower) in one `InferenceSession`.

Providers are tried in `PROVIDER_PREFERENCE` order, filtered by what this onnxruntime build offers, with the
CPU provider always last so that nodes a GPU provider cannot take still run. With the TensorRT provider,
engines it builds are cached in ``<model dir>/ort-tensorrt-cache/`` (keyed by ONNX Runtime on the graph and
the GPU), so only the first start on a machine pays for the build; when the model directory is read-only
(a baked image, a read-only volume) the cache is off and every start rebuilds.

Never imports torch: this is the slim serving install's engine.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.engines.base import EngineError

log = logging.getLogger("clipserve.engines")

CPU_PROVIDER = "CPUExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", CPU_PROVIDER)
TENSORRT_CACHE_DIR = "ort-tensorrt-cache"

# ONNX Runtime 1.32's CPU layout transformer (NCHWc) segfaults while optimising our fp16 text graph. It only
# re-lays-out convolutions for the CPU, which is not what fp16 graphs are for, so turning it off costs nothing.
# (export/parity.py has the same list; the service may not import export.)
CPU_FP16_DISABLED_OPTIMIZERS = ("NchwcTransformer",)

_NUMPY_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def choose_providers(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    """Providers to pass to ONNX Runtime: `requested` (or the preference order) filtered by `available`."""
    if requested:
        missing = [name for name in requested if name not in available]
        if missing:
            raise EngineError(
                f"ONNX Runtime provider(s) {', '.join(missing)} are not available in this onnxruntime build; "
                f"available: {', '.join(available) or '(none)'} (a GPU provider needs onnxruntime-gpu: "
                "pip install 'clipserve[gpu]')"
            )
        chosen = list(dict.fromkeys(name for name in requested if name != CPU_PROVIDER))
    else:
        chosen = [name for name in PROVIDER_PREFERENCE if name in available and name != CPU_PROVIDER]
    # CPU last, always: ONNX Runtime assigns each node to the first provider that takes it, so CPU only gets
    # the nodes a GPU provider refuses instead of the whole graph failing to load.
    if CPU_PROVIDER in available:
        chosen.append(CPU_PROVIDER)
    if not chosen:
        raise EngineError(f"no usable ONNX Runtime provider; available: {', '.join(available) or '(none)'}")
    log.info("onnxruntime providers: %s (available: %s)", ", ".join(chosen), ", ".join(available))
    return chosen


def _tensorrt_options(model_path: Path, precision: str) -> dict[str, Any]:
    options: dict[str, Any] = {"trt_fp16_enable": precision == "fp16"}
    cache = model_path.parent / TENSORRT_CACHE_DIR
    try:
        cache.mkdir(exist_ok=True)
        writable = os.access(cache, os.W_OK)
    except OSError:
        writable = False
    if writable:
        options |= {
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache),
        }
    else:
        log.warning("%s is not writable: TensorRT engines will be rebuilt on every start", cache)
    return options


class OnnxRuntimeEngine:
    """One ONNX graph; float32 [B, D] embeddings out whatever the graph's precision."""

    def __init__(
        self,
        path: Path,
        role: str,
        *,
        precision: str,
        providers: Sequence[str] = (),
        intra_op_threads: int = 0,
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise EngineError(f"ONNX graph {path} does not exist")
        self.role = role
        self.precision = precision
        self.max_batch_size: int | None = None  # dynamic batch axis, no limit of its own
        chosen = choose_providers(providers, ort.get_available_providers())

        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        kwargs: dict[str, Any] = {}
        if precision == "fp16":
            options.log_severity_level = 3  # the CPU provider warns about every cast the fp16 graph inserts
            if CPU_PROVIDER in chosen:
                kwargs["disabled_optimizers"] = list(CPU_FP16_DISABLED_OPTIMIZERS)
        provider_options = [_tensorrt_options(path, precision) if name == TENSORRT_PROVIDER else {} for name in chosen]
        try:
            self._session: ort.InferenceSession | None = ort.InferenceSession(
                str(path), options, providers=chosen, provider_options=provider_options, **kwargs
            )
        except Exception as error:  # onnxruntime raises its own exception types for a bad or unloadable graph
            raise EngineError(f"onnxruntime cannot load {path}: {error}") from error

        graph_input = self._session.get_inputs()[0]
        self._input_name = graph_input.name
        self._input_dtype = _NUMPY_DTYPES.get(graph_input.type)
        if self._input_dtype is None:
            raise EngineError(f"{path}: unsupported input type {graph_input.type}")
        # The provider that actually took the graph, which may differ from the first requested one.
        self.provider = self._session.get_providers()[0]
        self.description = f"onnxruntime {self.provider} {precision} {path.name}"

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        session = self._session
        if session is None:
            raise EngineError(f"{self.description} is closed")
        feed = np.ascontiguousarray(inputs, dtype=self._input_dtype)
        output = session.run(None, {self._input_name: feed})[0]
        return np.ascontiguousarray(output, dtype=np.float32)

    def close(self) -> None:
        self._session = None
