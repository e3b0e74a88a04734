"""A fake `tensorrt` module and device memory, shared by the TensorRT engine's tests.

faked, because TensorRT cannot be installed on this machine and there is no NVIDIA GPU: the TensorRT 10
name-based tensor API that `service.engines.tensorrt` uses, over `FakeDeviceMemory`, which stands in for the
`DeviceMemory` seam with host memory at 256-byte-aligned addresses and records every call. Reading or writing
memory that is not allocated fails the test. A real run needs an NVIDIA GPU with the plans built on it.
"""

from __future__ import annotations

import enum
import types
from pathlib import Path
from typing import Any

import numpy as np

from service.engines.base import EngineError
from service.engines.cuda_runtime import DeviceAllocation
from service.gpu.device_array import bfloat16_bits

EMBED_DIM = 64
FAKE_PLAN = b"fake-plan"
# IExecutionContext.setTensorAddress: "The pointer must have at least 256-byte alignment." (as CUDA's allocations are)
TENSOR_ALIGNMENT = 256


def unit_rows(array: np.ndarray) -> np.ndarray:
    return array / np.linalg.norm(array, axis=1, keepdims=True)


class FakeDeviceMemory:
    """faked: no GPU here. `DeviceMemory` on host memory at 256-byte-aligned addresses, so that device pointers are
    real addresses (pointer arithmetic and row views work). Every call is recorded in `events`; reading or writing
    memory that is not allocated (freed, or never handed out) fails the test instead of touching it."""

    def __init__(self) -> None:
        self.stream_handle = 4321
        self.closed = False
        self.events: list[tuple[Any, ...]] = []
        self.slots: dict[str, int] = {}
        self.freed: list[int] = []
        self._memory: dict[int, np.ndarray] = {}  # address -> its backing bytes
        self.allocation_failure: EngineError | None = None

    def _new(self, nbytes: int) -> int:
        backing = np.full(nbytes + TENSOR_ALIGNMENT, 0xFF, np.uint8)  # garbage, as cudaMalloc gives
        address = -backing.ctypes.data % TENSOR_ALIGNMENT + backing.ctypes.data
        self._memory[address] = backing[address - backing.ctypes.data :][:nbytes]
        return address

    def bytes_at(self, address: int, nbytes: int) -> np.ndarray:
        """The live memory [address, address + nbytes), as a writable view."""
        for base, backing in self._memory.items():
            if base <= address and address + nbytes <= base + backing.nbytes:
                return backing[address - base :][:nbytes]
        raise AssertionError(f"access to unallocated memory [0x{address:x}, +{nbytes})")

    def buffer(self, slot: str, nbytes: int) -> int:
        address = self.slots.get(slot)
        if address is None or self._memory[address].nbytes < nbytes:
            self._memory.pop(address, None)  # type: ignore[arg-type]
            address = self.slots[slot] = self._new(nbytes)
        return address

    def copy_in(self, address: int, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        self.bytes_at(address, data.nbytes)[:] = data

    def copy_out(self, address: int, out: np.ndarray) -> None:
        out.reshape(-1).view(np.uint8)[:] = self.bytes_at(address, out.nbytes)

    def allocate(self, nbytes: int) -> DeviceAllocation:
        if self.allocation_failure is not None:
            raise self.allocation_failure
        address = self._new(nbytes)
        self.events.append(("allocate", address, nbytes))
        return DeviceAllocation(address, nbytes, self._release)

    def _release(self, address: int) -> None:
        self.events.append(("free", address, "after close" if self.closed else "on the stream"))
        self.freed.append(address)
        del self._memory[address]

    def synchronize(self) -> None:
        self.events.append(("synchronize",))

    def copy_to_host(self, pointer: int, out: np.ndarray) -> None:
        out.reshape(-1).view(np.uint8)[:] = self.bytes_at(pointer, out.nbytes)

    def close(self) -> None:
        self.closed = True
        for address in self.slots.values():
            del self._memory[address]
        self.slots.clear()

    def names(self) -> list[str]:
        return [event[0] for event in self.events]

    @property
    def buffers(self) -> dict[int, np.ndarray]:
        """Live memory by address: the slots' buffers and any allocations."""
        return self._memory


class DataType(enum.Enum):
    """faked: `trt.DataType` (a pybind11 enum: members carry `.name`)."""

    FLOAT = np.float32
    HALF = np.float16
    BF16 = "bf16"
    INT8 = np.int8
    INT32 = np.int32
    INT64 = np.int64


def nptype(trt_type: DataType) -> type:
    """faked: `trt.nptype`, which (like TensorRT's) has no numpy type for bfloat16."""
    if trt_type is DataType.BF16:
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
    return trt_type.value


def fake_embed(inputs: np.ndarray, dim: int = EMBED_DIM) -> np.ndarray:
    """What the fake 'GPU' computes: deterministic unit rows of the input's first features."""
    flat = inputs.reshape(len(inputs), -1).astype(np.float64)
    return unit_rows(np.tile(flat, (1, -(-dim // flat.shape[1])))[:, :dim] + 1.0).astype(np.float32)


def encoded(rows: np.ndarray, output: DataType) -> np.ndarray:
    """The fake plan's output as the GPU stores it: float32, float16, or bfloat16 bits."""
    if output is DataType.BF16:
        return bfloat16_bits(rows)
    return rows.astype(output.value)


class FakeContext:
    def __init__(self, engine: FakeCudaEngine) -> None:
        self.engine = engine
        self.shape: tuple[int, ...] = ()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []  # every set_input_shape, in order
        self.streams: list[int] = []  # the stream of every enqueue
        self.addresses: dict[str, int] = {}
        self.fail_enqueue = False

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shape = tuple(shape)
        self.shapes.append((name, self.shape))
        return 1 <= shape[0] <= self.engine.max_batch

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return (self.shape[0], self.engine.dim)

    def set_tensor_address(self, name: str, address: int) -> bool:
        # TensorRT: "The pointer must have at least 256-byte alignment."
        assert address % TENSOR_ALIGNMENT == 0, f"{name} bound to an address without 256-byte alignment"
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        engine, memory = self.engine, self.engine.memory
        if self.fail_enqueue:
            return False
        self.streams.append(stream_handle)
        inputs_dtype = np.dtype(engine.input_dtype.value)
        count = int(np.prod(self.shape))
        raw = memory.bytes_at(self.addresses[engine.input], count * inputs_dtype.itemsize)
        outputs = encoded(fake_embed(raw.view(inputs_dtype).reshape(self.shape), engine.dim), engine.output_dtype)
        memory.bytes_at(self.addresses["embeddings"], outputs.nbytes)[:] = outputs.reshape(-1).view(np.uint8)
        memory.events.append(("execute", stream_handle, self.addresses["embeddings"], self.shape[0]))
        return True


class FakeCudaEngine:
    def __init__(
        self, memory: FakeDeviceMemory, input_name: str, input_dtype: str, output_dtype: str, max_batch: int
    ) -> None:
        self.memory, self.input = memory, input_name
        self.input_dtype, self.output_dtype = DataType[input_dtype], DataType[output_dtype]
        self.max_batch, self.dim = max_batch, EMBED_DIM
        self.num_io_tensors = 2
        self.contexts: list[FakeContext] = []

    def get_tensor_name(self, index: int) -> str:
        return [self.input, "embeddings"][index]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name == self.input else "OUTPUT"

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.input_dtype if name == self.input else self.output_dtype

    def create_execution_context(self) -> FakeContext:
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


def make_fake_tensorrt(memory: FakeDeviceMemory, max_batch: int = 8) -> types.ModuleType:
    """faked: TensorRT cannot be installed on this machine. A plan file (`write_plan`) names its input, the
    input's dtype and the output's."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.7.0"
    trt.engines = []  # type: ignore[attr-defined]

    class Logger:
        WARNING = 2

        def __init__(self, severity: int) -> None:
            self.severity = severity

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, data: bytes) -> FakeCudaEngine | None:
            if not data.startswith(FAKE_PLAN):
                return None  # what TensorRT does with another GPU's or version's plan
            input_name, input_dtype, output_dtype = data[len(FAKE_PLAN) + 1 :].decode().split(":")
            engine = FakeCudaEngine(memory, input_name, input_dtype, output_dtype, max_batch)
            trt.engines.append(engine)  # type: ignore[attr-defined]
            return engine

    trt.Logger = Logger  # type: ignore[attr-defined]
    trt.Runtime = Runtime  # type: ignore[attr-defined]
    trt.DataType = DataType  # type: ignore[attr-defined]
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")  # type: ignore[attr-defined]
    trt.nptype = nptype  # type: ignore[attr-defined]
    return trt


def write_plan(path: Path, input_name: str, dtype: str = "FLOAT", output: str = "FLOAT") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(FAKE_PLAN + f" {input_name}:{dtype}:{output}".encode())
    return path
