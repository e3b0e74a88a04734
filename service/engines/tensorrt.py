"""Native TensorRT engine: a serialized plan run with TensorRT 10's name-based tensor API.

A plan only deserializes on the GPU family (compute capability) and the TensorRT release that built it, so
the manifest records one build per ``tensorrt/<sm-arch>-trt<version>/`` directory and `select_build` picks the
one for this machine. Device buffers and the CUDA stream come from NVIDIA's CUDA Python bindings
(`service.engines.cuda_runtime`), behind the small `DeviceMemory` seam so that the logic runs in tests against
fakes. tensorrt and the bindings are imported only when an engine is built, never at module import; torch never.

`embed_on_device` leaves the embeddings in device memory for the similarity kernel: each call runs the plan into a
fresh allocation owned by the returned `DeviceArray` (never the reused "output" slot, which the next batch
overwrites), and waits for the engine's stream before handing it out, because the kernel runs on another stream.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from models.extras import TensorRTUnavailableError, load_tensorrt
from models.manifest import Manifest, TensorRTBuild
from service.engines.base import EngineError
from service.engines.cuda_runtime import CudaRuntimeMemory, DeviceAllocation
from service.gpu.device_array import ITEMSIZE, DeviceArray, widen_to_float32

log = logging.getLogger("clipserve.engines")

# TensorRT's output types that the similarity kernel takes, by `trt.DataType` member name.
DEVICE_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16"}


def require_tensorrt() -> ModuleType:
    """The `tensorrt` module, or the EngineError that stops a service started with CLIPSERVE_ENGINE=tensorrt."""
    try:
        return load_tensorrt()
    except TensorRTUnavailableError as error:
        raise EngineError(
            f"CLIPSERVE_ENGINE=tensorrt: {error} Serve those with CLIPSERVE_ENGINE=onnxruntime."
        ) from error


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

    # Memory that outlives the call: freed when the returned object is collected, also after close().
    def allocate(self, nbytes: int) -> DeviceAllocation: ...

    def synchronize(self) -> None: ...  # waits for the stream

    def copy_to_host(self, pointer: int, out: np.ndarray) -> None: ...  # blocking, off the stream, also after close()

    def close(self) -> None: ...


def _type_name(trt_type: Any) -> str:
    """ "HALF" for trt.DataType.HALF (pybind11 enums carry `.name`)."""
    return str(getattr(trt_type, "name", trt_type))


class TensorRTEngine:
    """One TensorRT plan with a dynamic batch axis.

    A call takes at most `max_batch_size` rows (the profile's max): the batcher never sends more, and a larger
    batch is refused with an EngineError rather than split here.
    """

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
        trt = require_tensorrt()
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
        # Embeddings can be left on the GPU (embed_on_device) when the plan outputs a type the kernel takes.
        self.device_resident = self._device_dtype is not None
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
        output_type = self._engine.get_tensor_dtype(self._output_name)
        self._output_type_name = _type_name(output_type)
        self._device_dtype = DEVICE_DTYPES.get(self._output_type_name)  # None: no device-resident path
        # numpy has no bfloat16 (and trt.nptype refuses it): bf16 outputs come to the host as their uint16 bits.
        bfloat16 = self._device_dtype == "bfloat16"
        self._output_dtype = np.dtype(np.uint16) if bfloat16 else np.dtype(trt.nptype(output_type))
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise EngineError(f"TensorRT could not create an execution context for {plan_path} (out of GPU memory?)")

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        with self._lock:
            context = self._context
            if context is None:
                raise EngineError(f"{self.description} is closed")
            self._bind_input(context, inputs)
            output = np.empty(tuple(context.get_tensor_shape(self._output_name)), self._output_dtype)
            memory = self._memory
            output_address = memory.buffer("output", output.nbytes)
            context.set_tensor_address(self._output_name, output_address)
            if not context.execute_async_v3(memory.stream_handle):
                raise EngineError(f"{self.description}: TensorRT failed to enqueue the batch")
            memory.copy_out(output_address, output)
        if self._device_dtype == "bfloat16":
            return widen_to_float32(output, "bfloat16")
        return np.ascontiguousarray(output, dtype=np.float32)

    def embed_on_device(self, inputs: np.ndarray) -> DeviceArray:
        """Like `__call__`, but the [B, D] embeddings stay in device memory, in the plan's output dtype."""
        dtype = self._device_dtype
        if dtype is None:
            raise EngineError(
                f"{self.description}: its output type {self._output_type_name} cannot stay on the device; the "
                f"similarity kernel takes {', '.join(DEVICE_DTYPES)} outputs"
            )
        with self._lock:
            context = self._context
            if context is None:
                raise EngineError(f"{self.description} is closed")
            memory = self._memory
            self._bind_input(context, inputs)
            rows = len(inputs)
            shape = tuple(context.get_tensor_shape(self._output_name))
            if len(shape) != 2 or shape[0] != rows:
                raise EngineError(
                    f"{self.description}: output shape {shape} for a batch of {rows}; expected [batch, dim]"
                )
            # setTensorAddress needs 256-byte alignment, which every CUDA allocation has: the plan writes straight in.
            allocation = memory.allocate(rows * shape[1] * ITEMSIZE[dtype])
            context.set_tensor_address(self._output_name, allocation.address)
            if not context.execute_async_v3(memory.stream_handle):
                raise EngineError(f"{self.description}: TensorRT failed to enqueue the batch")
            # The kernel that reads these rows runs on another stream: it may start only once this one is done.
            memory.synchronize()
        return DeviceArray(
            allocation.address, (rows, int(shape[1])), dtype, allocation, copy_to_host=memory.copy_to_host
        )

    def _bind_input(self, context: Any, inputs: np.ndarray) -> None:
        """Sets the batch shape and copies the inputs into the "input" slot."""
        host = np.ascontiguousarray(inputs, dtype=self._input_dtype)
        # TensorRT refuses a shape outside the profile, a batch above its max included (nothing splits it here).
        if not context.set_input_shape(self._input_name, host.shape):
            raise EngineError(
                f"{self.description}: input shape {host.shape} is outside the engine's optimisation profile "
                f"(its max batch is {self.max_batch_size})"
            )
        memory = self._memory
        input_address = memory.buffer("input", host.nbytes)
        memory.copy_in(input_address, host)
        context.set_tensor_address(self._input_name, input_address)

    def close(self) -> None:
        with self._lock:
            # Memory first: closing it waits for the stream, so no work is in flight when the context goes.
            self._memory.close()
            self._context = None
            self._engine = None
            self._runtime = None
