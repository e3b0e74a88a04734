"""ONNX Runtime engine: one exported graph (image or text tower) in one `InferenceSession`.

Providers are tried in `PROVIDER_PREFERENCE` order, filtered by what this onnxruntime build offers, with the
CPU provider always last so that nodes a GPU provider cannot take still run. With the TensorRT provider,
engines it builds are cached in ``<model dir>/ort-tensorrt-cache/`` (keyed by ONNX Runtime on the graph and
the GPU), so only the first start on a machine pays for the build; when the model directory is read-only
(a baked image, a read-only volume) the cache is off and every start rebuilds.

With a CUDA or TensorRT provider first, `embed_on_device` keeps the embeddings on the GPU through IOBinding: the
output is bound to CUDA memory that ONNX Runtime allocates per run, and the returned `DeviceArray` owns the
OrtValue holding it. (`IOBinding.get_outputs()` returns copies of the binding's OrtValues, which share ownership
of the tensor, so the memory stays valid after the binding is cleared, reused or collected.)

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
from service.gpu.device_array import DeviceArray

log = logging.getLogger("clipserve.engines")

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
DEVICE_PROVIDERS = (TENSORRT_PROVIDER, CUDA_PROVIDER)  # providers whose outputs can stay in CUDA memory
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
# Output types the similarity kernel takes, as OrtValue.data_type() names them.
_DEVICE_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16"}


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
        spin: bool = False,
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise EngineError(f"ONNX graph {path} does not exist")
        self.role = role
        self.precision = precision
        self.max_batch_size: int | None = None  # dynamic batch axis, no limit of its own
        chosen = choose_providers(providers, ort.get_available_providers())

        options = ort.SessionOptions()
        # ONNX Runtime's threads spin for work after every run by default. Here they share the cores with the
        # event loop, the decode pool and the other session, which the spinning starves: on 2 cores it added about
        # 4 ms to a demo-model request at concurrency 1 and 10 ms at 1,000 labels (loadtests/bench breakdown).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
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
        self.device_resident = self.provider in DEVICE_PROVIDERS

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        session = self._session
        if session is None:
            raise EngineError(f"{self.description} is closed")
        feed = np.ascontiguousarray(inputs, dtype=self._input_dtype)
        output = session.run(None, {self._input_name: feed})[0]
        return np.ascontiguousarray(output, dtype=np.float32)

    def embed_on_device(self, inputs: np.ndarray) -> DeviceArray:
        """Like `__call__`, but the [B, D] embeddings stay in CUDA memory, in the graph's output dtype."""
        session = self._session
        if session is None:
            raise EngineError(f"{self.description} is closed")
        if not self.device_resident:
            raise EngineError(
                f"{self.description}: embeddings stay on the device only with {' or '.join(DEVICE_PROVIDERS)} "
                "first; this session computes on the host"
            )
        feed = np.ascontiguousarray(inputs, dtype=self._input_dtype)
        device_id = _device_id(session, self.provider)
        binding = session.io_binding()
        binding.bind_cpu_input(self._input_name, feed)
        # No buffer given: ONNX Runtime allocates a fresh output on the GPU each run (the batch size varies).
        binding.bind_output(session.get_outputs()[0].name, "cuda", device_id)
        try:
            session.run_with_iobinding(binding)
            # Run already waits for the provider's stream by default; this makes it explicit, because the
            # similarity kernel reads the output from another stream.
            binding.synchronize_outputs()
        except Exception as error:  # onnxruntime raises its own exception types (a bad shape, out of memory)
            raise EngineError(f"{self.description}: the IOBinding run failed: {error}") from error
        return _device_array(binding.get_outputs()[0], device_id, self.description)

    def close(self) -> None:
        self._session = None


def _device_id(session: Any, provider: str) -> int:
    """The CUDA device the session's provider runs on (its "device_id" option; 0 when not set)."""
    options = session.get_provider_options().get(provider, {})
    return int(options.get("device_id", 0) or 0)


def _device_array(value: Any, device_id: int, description: str) -> DeviceArray:
    """A DeviceArray over a CUDA OrtValue, which stays its owner so ONNX Runtime's memory lives as long as it."""
    dtype = _DEVICE_DTYPES.get(value.data_type())
    shape = tuple(value.shape())
    if value.device_name() != "cuda" or dtype is None or len(shape) != 2:
        raise EngineError(
            f"{description}: expected a 2-D float32/float16/bfloat16 CUDA output, got {value.data_type()} "
            f"{list(shape)} on {value.device_name()}"
        )
    base = int(value.data_ptr())

    def copy_to_host(pointer: int, out: np.ndarray) -> None:
        # OrtValue.numpy() copies a CUDA tensor to the host with ONNX Runtime's own CUDA copy, so reading back
        # needs no CUDA bindings of ours; a row view is the matching byte range of that copy.
        offset = pointer - base
        whole = np.ascontiguousarray(value.numpy()).reshape(-1).view(np.uint8)
        if offset < 0 or offset + out.nbytes > whole.nbytes:
            raise EngineError(f"{description}: bytes [{offset}, {offset + out.nbytes}) are outside the output")
        out.reshape(-1).view(np.uint8)[:] = whole[offset : offset + out.nbytes]

    return DeviceArray(base, (int(shape[0]), int(shape[1])), dtype, value, device=device_id, copy_to_host=copy_to_host)
