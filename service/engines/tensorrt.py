"""Native TensorRT engine: a serialized plan run with TensorRT 10's name-based tensor API.

A plan only deserializes on the GPU family (compute capability) and the TensorRT release that built it, so
the manifest records one build per ``tensorrt/<sm-arch>-trt<version>/`` directory and `select_build` picks the
one for this machine. Device buffers and the CUDA stream come from NVIDIA's CUDA Python bindings
(`service.engines.cuda_runtime`), behind the small `DeviceMemory` seam so that the logic runs in tests against
fakes. tensorrt and the bindings are imported only when an engine is built, never at module import; torch never.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from types import ModuleType
from typing import Protocol

import numpy as np

from models.manifest import Manifest, TensorRTBuild
from service.engines.base import EngineError
from service.engines.cuda_runtime import GPU_EXTRA, CudaRuntimeMemory

log = logging.getLogger("clipserve.engines")


def load_tensorrt() -> ModuleType:
    """The `tensorrt` module, or an EngineError saying how to get it."""
    try:
        import tensorrt
    # The wheel imports, then dlopens libnvinfer; a broken CUDA install shows up as OSError, not ImportError.
    except (ImportError, OSError) as error:
        raise EngineError(
            f"CLIPSERVE_ENGINE=tensorrt needs TensorRT, which cannot be imported here ({error}); on an NVIDIA "
            f"GPU machine run {GPU_EXTRA}, or use CLIPSERVE_ENGINE=onnxruntime"
        ) from error
    return tensorrt


def _describe_build(build: TensorRTBuild) -> str:
    return (
        f"{build.directory} ({build.gpu_name}, compute capability {build.compute_capability}, "
        f"TensorRT {build.tensorrt_version}, {build.precision})"
    )


def select_build(manifest: Manifest, compute_capability: str, tensorrt_version: str) -> TensorRTBuild:
    """The manifest's TensorRT build that runs on this GPU and TensorRT version."""
    for build in manifest.tensorrt:
        if build.runs_on(compute_capability, tensorrt_version):
            return build
    builds = "; ".join(map(_describe_build, manifest.tensorrt)) or "none"
    raise EngineError(
        f"{manifest.name} has no TensorRT engines for this machine (compute capability {compute_capability}, "
        f"TensorRT {tensorrt_version}); builds in the manifest: {builds}. TensorRT engines are only valid on the "
        "GPU family they were built for; re-export with --formats tensorrt on this machine, or use "
        "CLIPSERVE_ENGINE=onnxruntime"
    )


class DeviceMemory(Protocol):
    """Device buffers and one CUDA stream: the seam between the engine's logic and the GPU."""

    @property
    def stream_handle(self) -> int: ...

    def buffer(self, slot: str, nbytes: int) -> int: ...  # device address of >= nbytes, reused per slot

    def copy_in(self, address: int, array: np.ndarray) -> None: ...  # host -> device, on the stream

    def copy_out(self, address: int, out: np.ndarray) -> None: ...  # device -> host, then waits for the stream

    def close(self) -> None: ...


class TensorRTEngine:
    """One TensorRT plan with a dynamic batch axis; batches above the profile's max are run in chunks."""

    def __init__(
        self,
        plan_path: Path,
        role: str,
        *,
        input_name: str,
        max_batch_size: int,
        precision: str = "fp32",
        memory: DeviceMemory | None = None,
    ) -> None:
        plan_path = Path(plan_path)
        if not plan_path.is_file():
            raise EngineError(f"TensorRT plan {plan_path} does not exist")
        trt = load_tensorrt()
        self.role = role
        self.max_batch_size: int | None = max_batch_size
        self.precision = precision
        # Memory first: the CUDA runtime then holds the device's primary context, which TensorRT picks up and shares.
        self._memory = memory if memory is not None else CudaRuntimeMemory()
        try:
            self._load(trt, plan_path, input_name)
        except BaseException:
            self._memory.close()  # its stream and buffers would otherwise outlive the failed engine
            raise
        # An execution context holds per-call shapes and addresses: one call at a time.
        self._lock = threading.Lock()
        self.description = f"tensorrt {trt.__version__} {precision} {plan_path.parent.name}/{plan_path.name}"

    def _load(self, trt: ModuleType, plan_path: Path, input_name: str) -> None:
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        # The runtime must outlive the engine it deserialized, so it is kept.
        self._runtime = trt.Runtime(self._trt_logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self._engine is None:
            raise EngineError(
                f"TensorRT {trt.__version__} could not deserialize {plan_path}; plans only load on the GPU family "
                "and TensorRT version that built them (the TensorRT log above says more)"
            )
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if inputs != [input_name] or len(outputs) != 1:
            raise EngineError(f"{plan_path}: expected one input {input_name!r} and one output; found {names}")
        self._input_name, self._output_name = input_name, outputs[0]
        self._input_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(input_name)))
        self._output_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(self._output_name)))
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise EngineError(f"TensorRT could not create an execution context for {plan_path} (out of GPU memory?)")

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        step = self.max_batch_size or len(inputs)
        if len(inputs) <= step:
            return self._run(inputs)
        return np.concatenate([self._run(inputs[i : i + step]) for i in range(0, len(inputs), step)])

    def _run(self, inputs: np.ndarray) -> np.ndarray:
        with self._lock:
            context = self._context
            if context is None:
                raise EngineError(f"{self.description} is closed")
            host = np.ascontiguousarray(inputs, dtype=self._input_dtype)
            if not context.set_input_shape(self._input_name, host.shape):
                raise EngineError(
                    f"{self.description}: input shape {host.shape} is outside the engine's optimisation profile"
                )
            output = np.empty(tuple(context.get_tensor_shape(self._output_name)), self._output_dtype)
            memory = self._memory
            input_address = memory.buffer("input", host.nbytes)
            output_address = memory.buffer("output", output.nbytes)
            memory.copy_in(input_address, host)
            context.set_tensor_address(self._input_name, input_address)
            context.set_tensor_address(self._output_name, output_address)
            if not context.execute_async_v3(memory.stream_handle):
                raise EngineError(f"{self.description}: TensorRT failed to enqueue the batch")
            memory.copy_out(output_address, output)
        return np.ascontiguousarray(output, dtype=np.float32)

    def close(self) -> None:
        with self._lock:
            # Memory first: closing it waits for the stream, so no work is in flight when the context goes.
            self._memory.close()
            self._context = None
            self._engine = None
            self._runtime = None
