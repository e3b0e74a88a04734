"""Device-resident embeddings (`embed_on_device`) of the ONNX Runtime and TensorRT engines.

What runs for real here: ONNX Runtime CPU sessions on the committed demo model (the CPU engine reports
`device_resident = False` and its `__call__` is unchanged), the `DeviceArray` and `DeviceAllocation` lifetime
machinery (weakref finalizers), and every line of the engines' logic.

faked, because this machine has no NVIDIA GPU, no onnxruntime-gpu and no TensorRT: the GPU boundary only.
- ONNX Runtime's CUDA provider: `FakeCudaSession` mimics the documented slice of `InferenceSession` + `IOBinding` +
  `OrtValue` that the engine uses (io_binding, bind_cpu_input, bind_output, run_with_iobinding,
  synchronize_outputs, get_outputs, data_ptr/shape/data_type/device_name/numpy). Its "CUDA memory" is host memory,
  and the numbers in it come from a real CPU session on the demo graph.
- TensorRT: a fake `tensorrt` module (the TensorRT 10 name-based tensor API) over `FakeDeviceMemory`, which stands
  in for the `DeviceMemory` seam with host memory at 256-byte-aligned addresses and records every call.
- `CudaRuntimeMemory`'s own calls are checked against `FakeCudart` (the slice of `cuda.bindings.runtime` it calls).

NEVER RUN on real onnxruntime-gpu (IOBinding with CUDA outputs) nor on real TensorRT (plans into allocations):
those paths stay "never run" until a machine with them exists. The one `gpu` test runs `CudaRuntimeMemory`'s
allocation path on real CUDA where a GPU is visible.
"""

from __future__ import annotations

import ctypes
import enum
import gc
import itertools
import logging
import sys
import types
import weakref
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort
import pytest

from models.demo.config import EXPORT_NAME, REPOSITORY_DIR
from service.engines import cuda_runtime
from service.engines.base import EngineError
from service.engines.cuda_runtime import DeviceAllocation
from service.engines.onnxruntime import OnnxRuntimeEngine
from service.engines.tensorrt import TensorRTEngine
from service.gpu.device_array import DeviceArray, widen_to_float32
from tests.gpu import requires_gpu
from tests.service.fake_tensorrt import (
    EMBED_DIM,
    DataType,
    FakeDeviceMemory,
    encoded,
    fake_embed,
    make_fake_tensorrt,
    write_plan,
)

DEMO_DIR = REPOSITORY_DIR / EXPORT_NAME
CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
RealInferenceSession = ort.InferenceSession  # kept before any test patches the module attribute


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((5, 3, 64, 64)).astype(np.float32)


# ------------------------------------------------------------------------------------ onnxruntime, real CPU


@pytest.mark.parametrize("graph,role", [("image.onnx", "image"), ("text.onnx", "text")])
def test_cpu_onnxruntime_engine_is_not_device_resident_and_refuses_embed_on_device(graph, role):
    engine = OnnxRuntimeEngine(DEMO_DIR / graph, role, precision="fp32")
    assert engine.provider == CPU and engine.device_resident is False
    with pytest.raises(EngineError, match=r"only with TensorrtExecutionProvider or CUDAExecutionProvider first"):
        engine.embed_on_device(np.zeros((1, 3, 64, 64), np.float32))


def test_cpu_onnxruntime_engine_call_is_unchanged(pixels):
    """`__call__` on the CPU provider: exactly a plain session's output, as float32."""
    engine = OnnxRuntimeEngine(DEMO_DIR / "image.onnx", "image", precision="fp32")
    session = RealInferenceSession(str(DEMO_DIR / "image.onnx"), providers=[CPU])
    out = engine(pixels)
    assert out.dtype == np.float32 and out.shape == (5, 64)
    np.testing.assert_array_equal(out, session.run(None, {"pixels": pixels})[0])


# ------------------------------------------------------------------------ onnxruntime, faked CUDA provider


class FakeOrtValue:
    """faked: an OrtValue on "cuda" (host memory here). Copies share the array, as ORT's share the tensor."""

    def __init__(self, array: np.ndarray, device: str = "cuda") -> None:
        self._array, self._device = array, device
        self.numpy_calls = 0

    def data_ptr(self) -> int:
        return int(self._array.ctypes.data)

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def data_type(self) -> str:
        return {np.float32: "tensor(float)", np.float16: "tensor(float16)"}[self._array.dtype.type]

    def device_name(self) -> str:
        return self._device

    def numpy(self) -> np.ndarray:
        self.numpy_calls += 1
        return self._array.copy()  # ORT copies a CUDA tensor to the host


class FakeIOBinding:
    """faked: the IOBinding calls the engine makes, recorded; outputs are fresh memory per run, as ORT allocates."""

    def __init__(self, session: FakeCudaSession) -> None:
        self.session = session
        self.inputs: dict[str, np.ndarray] = {}
        self.outputs: dict[str, tuple[str, int]] = {}
        self.synchronized = False
        self._values: list[np.ndarray] = []

    def bind_cpu_input(self, name: str, array: np.ndarray) -> None:
        self.inputs[name] = array

    def bind_output(self, name: str, device_type: str = "cpu", device_id: int = 0) -> None:
        self.outputs[name] = (device_type, device_id)

    def synchronize_outputs(self) -> None:
        self.synchronized = True

    def get_outputs(self) -> list[FakeOrtValue]:
        return [FakeOrtValue(value, self.session.output_device) for value in self._values]


class FakeCudaSession:
    """faked: InferenceSession with the CUDA (or TensorRT) provider first. The numbers come from a real CPU session
    on the same graph; `output_dtype` stands in for an fp16 graph's float16 output."""

    output_dtype: Any = np.float32
    output_device = "cuda"
    extra_axis = False  # a [B, D, 1] output, which the engine must refuse
    failure: Exception | None = None
    provider_options: ClassVar[dict[str, dict[str, str]]] = {}
    instances: ClassVar[list[FakeCudaSession]] = []

    def __init__(self, path: str, options: ort.SessionOptions, *, providers: list[str], **kwargs: Any) -> None:
        self._real = RealInferenceSession(path, providers=[CPU])
        self._providers = providers
        self.bindings: list[FakeIOBinding] = []
        type(self).instances.append(self)

    def get_inputs(self) -> list[Any]:
        return self._real.get_inputs()

    def get_outputs(self) -> list[Any]:
        return self._real.get_outputs()

    def get_providers(self) -> list[str]:
        return self._providers

    def get_provider_options(self) -> dict[str, dict[str, str]]:
        return self.provider_options

    def run(self, names: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [output.astype(self.output_dtype) for output in self._real.run(names, feed)]

    def io_binding(self) -> FakeIOBinding:
        self.bindings.append(FakeIOBinding(self))
        return self.bindings[-1]

    def run_with_iobinding(self, binding: FakeIOBinding) -> None:
        if self.failure is not None:
            raise self.failure
        output = self.run(None, binding.inputs)[0]
        binding._values = [np.ascontiguousarray(output[..., None]) if self.extra_axis else output]


@pytest.fixture
def fake_cuda_ort(monkeypatch) -> type[FakeCudaSession]:
    """onnxruntime with a (faked) CUDA provider: the engine is built on FakeCudaSession."""

    class Session(FakeCudaSession):
        instances: ClassVar[list[FakeCudaSession]] = []
        provider_options: ClassVar[dict[str, dict[str, str]]] = {CUDA: {"device_id": "0"}, CPU: {}}

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", Session)
    return Session


def cuda_engine(graph: str = "image.onnx", role: str = "image", precision: str = "fp32") -> OnnxRuntimeEngine:
    return OnnxRuntimeEngine(DEMO_DIR / graph, role, precision=precision)


def test_ort_cuda_engine_binds_input_from_host_and_output_to_cuda(fake_cuda_ort, pixels):
    fake_cuda_ort.provider_options = {CUDA: {"device_id": "1"}, CPU: {}}
    engine = cuda_engine()
    assert engine.provider == CUDA and engine.device_resident is True
    embeddings = engine.embed_on_device(pixels)
    (binding,) = fake_cuda_ort.instances[0].bindings
    np.testing.assert_array_equal(binding.inputs["pixels"], pixels)
    assert binding.outputs == {"embeddings": ("cuda", 1)}
    assert binding.synchronized  # before the kernel on another stream may read it
    assert isinstance(embeddings, DeviceArray)
    assert embeddings.shape == (5, 64) and embeddings.dtype == "float32" and embeddings.device == 1
    owner = embeddings.owner
    assert isinstance(owner, FakeOrtValue) and embeddings.pointer == owner.data_ptr()


def test_ort_device_array_reads_back_what_call_returns(fake_cuda_ort, pixels):
    engine = cuda_engine()
    embeddings = engine.embed_on_device(pixels)
    expected = engine(pixels)
    np.testing.assert_array_equal(embeddings.to_host(), expected)
    np.testing.assert_array_equal(embeddings.rows(1, 4).to_host(), expected[1:4])  # a view reads its own rows
    np.testing.assert_array_equal(embeddings[4:].to_host(), expected[4:])
    assert embeddings.owner.numpy_calls == 3  # copied back with the OrtValue's own numpy(), no CUDA bindings


def test_ort_text_engine_binds_int64_token_ids(fake_cuda_ort):
    engine = cuda_engine("text.onnx", "text")
    tokens = np.zeros((2, 32), np.int32)
    tokens[:, :2] = 49406, 49407
    embeddings = engine.embed_on_device(tokens)
    (binding,) = fake_cuda_ort.instances[0].bindings
    assert binding.inputs["token_ids"].dtype == np.int64  # cast to the graph's input type
    np.testing.assert_allclose(np.linalg.norm(embeddings.to_host(), axis=1), 1.0, atol=1e-5)


def test_ort_outputs_of_earlier_batches_stay_valid(fake_cuda_ort, pixels):
    engine = cuda_engine()
    first = engine.embed_on_device(pixels[:2])
    second = engine.embed_on_device(pixels[2:])
    assert first.pointer != second.pointer  # a fresh output per run, never a buffer the next batch reuses
    np.testing.assert_array_equal(first.to_host(), engine(pixels[:2]))
    np.testing.assert_array_equal(second.to_host(), engine(pixels[2:]))


def test_ort_output_value_lives_as_long_as_its_last_view(fake_cuda_ort, pixels):
    engine = cuda_engine()
    embeddings = engine.embed_on_device(pixels)
    owner = weakref.ref(embeddings.owner)
    view = embeddings.rows(2, 3)
    del embeddings
    gc.collect()
    assert owner() is not None
    del view
    gc.collect()
    assert owner() is None


def test_ort_fp16_graph_outputs_float16_on_the_device(fake_cuda_ort, pixels):
    fake_cuda_ort.output_dtype = np.float16
    engine = cuda_engine(precision="fp16")
    embeddings = engine.embed_on_device(pixels)
    assert embeddings.dtype == "float16" and embeddings.nbytes == 5 * 64 * 2
    host = embeddings.to_host()
    assert host.dtype == np.float32
    np.testing.assert_array_equal(host, engine(pixels))  # __call__ widens the same float16 values


def test_ort_tensorrt_provider_is_device_resident_too(fake_cuda_ort, monkeypatch, tmp_path, pixels):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    fake_cuda_ort.provider_options = {TRT: {"device_id": "0"}, CUDA: {"device_id": "0"}, CPU: {}}
    graph = tmp_path / "image.onnx"
    graph.write_bytes((DEMO_DIR / "image.onnx").read_bytes())
    engine = OnnxRuntimeEngine(graph, "image", precision="fp32")
    assert engine.provider == TRT and engine.device_resident
    assert engine.embed_on_device(pixels).shape == (5, 64)


def test_ort_embed_on_device_errors_are_engine_errors(fake_cuda_ort, pixels):
    engine = cuda_engine()
    fake_cuda_ort.failure = RuntimeError("CUDA failure 2: out of memory")
    with pytest.raises(EngineError, match=r"IOBinding run failed: CUDA failure 2: out of memory"):
        engine.embed_on_device(pixels)
    fake_cuda_ort.failure = None
    fake_cuda_ort.output_device = "cpu"  # e.g. a provider that put the output on the host after all
    with pytest.raises(EngineError, match=r"expected a 2-D float32/float16/bfloat16 CUDA output, got .* on cpu"):
        engine.embed_on_device(pixels)
    fake_cuda_ort.output_device = "cuda"
    fake_cuda_ort.extra_axis = True
    with pytest.raises(EngineError, match=r"expected a 2-D .*\[5, 64, 1\]"):
        engine.embed_on_device(pixels)
    engine.close()
    with pytest.raises(EngineError, match="closed"):
        engine.embed_on_device(pixels)


# ------------------------------------------------------------------------------ TensorRT, faked GPU boundary


@pytest.fixture
def memory() -> FakeDeviceMemory:
    return FakeDeviceMemory()


@pytest.fixture
def fake_trt(monkeypatch, memory) -> types.ModuleType:
    trt = make_fake_tensorrt(memory)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


def trt_engine(
    tmp_path: Path,
    memory: FakeDeviceMemory,
    output: str = "FLOAT",
    *,
    max_batch: int = 8,
    dim: int = EMBED_DIM,
    precision: str = "fp32",
) -> TensorRTEngine:
    plan = write_plan(tmp_path / f"image-{output}.plan", "pixels", "FLOAT", output)
    engine = TensorRTEngine(
        plan, "image", input_name="pixels", max_batch_size=max_batch, precision=precision, memory=memory
    )
    fake = sys.modules["tensorrt"].engines[-1]  # type: ignore[attr-defined]
    fake.max_batch, fake.dim = max_batch, dim
    return engine


def small_pixels(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((rows, 3, 8, 8), dtype=np.float32)


def test_trt_embed_on_device_runs_the_plan_into_a_fresh_allocation(fake_trt, memory, tmp_path):
    engine = trt_engine(tmp_path, memory)
    assert engine.device_resident is True
    inputs = small_pixels(5)
    embeddings = engine.embed_on_device(inputs)
    assert isinstance(embeddings, DeviceArray) and isinstance(embeddings.owner, DeviceAllocation)
    assert embeddings.shape == (5, EMBED_DIM) and embeddings.dtype == "float32"
    (allocation,) = [event for event in memory.events if event[0] == "allocate"]
    assert allocation[1:] == (embeddings.pointer, 5 * EMBED_DIM * 4) == (embeddings.owner.address, embeddings.nbytes)
    assert embeddings.pointer not in memory.slots.values()  # not the "output" slot that the next batch reuses
    # run on the engine's stream, straight into the allocation, and the stream waited for before handing it out
    assert memory.events[1:] == [("execute", memory.stream_handle, embeddings.pointer, 5), ("synchronize",)]
    np.testing.assert_array_equal(embeddings.to_host(), fake_embed(inputs))
    np.testing.assert_array_equal(embeddings.to_host(), engine(inputs))  # equal to the host path


def test_trt_earlier_batches_are_not_overwritten_by_later_ones(fake_trt, memory, tmp_path):
    engine = trt_engine(tmp_path, memory)
    first_inputs, second_inputs = small_pixels(4, seed=1), small_pixels(4, seed=2)
    first = engine.embed_on_device(first_inputs)
    second = engine.embed_on_device(second_inputs)
    engine(small_pixels(8, seed=3))  # the host path's slots in between
    assert first.pointer != second.pointer
    np.testing.assert_array_equal(first.to_host(), fake_embed(first_inputs))
    np.testing.assert_array_equal(second.to_host(), fake_embed(second_inputs))


def test_trt_allocation_is_freed_once_when_the_last_view_goes(fake_trt, memory, tmp_path):
    engine = trt_engine(tmp_path, memory)
    embeddings = engine.embed_on_device(small_pixels(6))
    address = embeddings.pointer
    top, bottom = embeddings.rows(0, 3), embeddings[3:]
    del embeddings
    gc.collect()
    assert memory.freed == []  # the views still hold the owner
    np.testing.assert_array_equal(bottom.to_host(), fake_embed(small_pixels(6))[3:])
    del top
    gc.collect()
    assert memory.freed == []
    del bottom
    gc.collect()
    assert memory.freed == [address]
    assert memory.events[-1] == ("free", address, "on the stream")
    gc.collect()
    assert memory.freed == [address]  # once only


def test_device_allocation_free_is_idempotent_and_the_finalizer_does_not_run_again():
    released: list[int] = []
    allocation = DeviceAllocation(0x1000, 256, released.append)
    assert allocation.alive
    allocation.free()
    allocation.free()
    assert released == [0x1000] and not allocation.alive
    assert "freed" in repr(allocation)
    del allocation
    gc.collect()
    assert released == [0x1000]


def test_trt_closing_the_engine_with_outstanding_views_is_safe(fake_trt, memory, tmp_path):
    engine = trt_engine(tmp_path, memory)
    inputs = small_pixels(3)
    embeddings = engine.embed_on_device(inputs)
    engine.close()
    assert memory.closed and memory.freed == []  # closing does not take memory a view still points at
    np.testing.assert_array_equal(embeddings.to_host(), fake_embed(inputs))  # readable after close
    with pytest.raises(EngineError, match="is closed"):
        engine.embed_on_device(inputs)
    address = embeddings.pointer
    del embeddings
    gc.collect()
    assert memory.events[-1] == ("free", address, "after close")


def test_trt_embed_on_device_refuses_a_batch_above_the_profile_max(fake_trt, memory, tmp_path):
    """The batcher sends at most max_batch_size rows; a larger batch is an error before any device memory is taken."""
    engine = trt_engine(tmp_path, memory, max_batch=4)
    with pytest.raises(EngineError, match=r"input shape \(10, 3, 8, 8\) is outside .*\(its max batch is 4\)"):
        engine.embed_on_device(small_pixels(10))
    assert "allocate" not in memory.names() and "execute" not in memory.names()
    inputs = small_pixels(4)
    np.testing.assert_array_equal(engine.embed_on_device(inputs).to_host(), fake_embed(inputs))


@pytest.mark.parametrize("output,dtype,tolerance", [("HALF", "float16", 1e-3), ("BF16", "bfloat16", 8e-3)])
def test_trt_half_precision_outputs_stay_half_on_the_device(fake_trt, memory, tmp_path, output, dtype, tolerance):
    engine = trt_engine(tmp_path, memory, output=output, precision="fp16")
    inputs = small_pixels(4)
    embeddings = engine.embed_on_device(inputs)
    assert embeddings.dtype == dtype and embeddings.nbytes == 4 * EMBED_DIM * 2
    raw = np.empty((4, EMBED_DIM), np.uint16)
    memory.copy_to_host(embeddings.pointer, raw)
    np.testing.assert_array_equal(raw, encoded(fake_embed(inputs), DataType[output]).view(np.uint16))
    np.testing.assert_allclose(embeddings.to_host(), fake_embed(inputs), atol=tolerance)
    host = engine(inputs)  # the host path widens the same values (bf16 through its bits: numpy has no bfloat16)
    assert host.dtype == np.float32
    np.testing.assert_array_equal(host, widen_to_float32(raw, dtype))


def test_trt_output_types_the_kernel_cannot_take_are_refused_clearly(fake_trt, memory, tmp_path):
    engine = trt_engine(tmp_path, memory, output="INT8")
    assert engine.device_resident is False
    with pytest.raises(EngineError, match=r"output type INT8 cannot stay on the device.*FLOAT, HALF, BF16"):
        engine.embed_on_device(small_pixels(2))
    assert "allocate" not in memory.names()


def test_trt_embed_on_device_errors_are_engine_errors_and_leak_nothing(fake_trt, memory, tmp_path):
    engine = trt_engine(tmp_path, memory)
    with pytest.raises(EngineError, match=r"input shape \(0, 3, 8, 8\) is outside the engine's optimisation profile"):
        engine.embed_on_device(small_pixels(0))
    engine._context.fail_enqueue = True  # type: ignore[union-attr]
    with pytest.raises(EngineError, match="TensorRT failed to enqueue the batch"):
        engine.embed_on_device(small_pixels(6))
    gc.collect()
    (allocated,) = [event[1] for event in memory.events if event[0] == "allocate"]
    assert memory.freed == [allocated]  # the half-written allocation went back with the failed call
    engine._context.fail_enqueue = False  # type: ignore[union-attr]
    memory.allocation_failure = EngineError("CUDA cudaMallocAsync failed: cudaErrorMemoryAllocation (out of memory)")
    with pytest.raises(EngineError, match="cudaMallocAsync failed"):
        engine.embed_on_device(small_pixels(2))
    memory.allocation_failure = None
    np.testing.assert_array_equal(engine.embed_on_device(small_pixels(2)).to_host(), fake_embed(small_pixels(2)))
    engine._context.get_tensor_shape = lambda name: (2, EMBED_DIM, 1)  # type: ignore[union-attr]
    with pytest.raises(EngineError, match=r"output shape \(2, 64, 1\) for a batch of 2; expected \[batch, dim\]"):
        engine.embed_on_device(small_pixels(2))


# ------------------------------------------------------------------------- CudaRuntimeMemory, faked runtime


class FakeCudart:
    """faked: no GPU here. The slice of `cuda.bindings.runtime` that CudaRuntimeMemory calls, with the same
    `(error, *values)` returns, on host memory (ctypes buffers stand in for device allocations)."""

    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0
        cudaErrorInvalidValue = 1
        cudaErrorMemoryAllocation = 2

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.allocations: dict[int, ctypes.Array] = {}
        self.fail_free = False
        self._streams = itertools.count(77)
        ok = (self.cudaError_t.cudaSuccess,)
        for name, call in {
            "cudaSetDevice": lambda device: ok,
            "cudaStreamCreate": lambda: (*ok, next(self._streams)),
            "cudaStreamSynchronize": lambda stream: ok,
            "cudaStreamDestroy": lambda stream: ok,
            "cudaMalloc": self._malloc,
            "cudaMallocAsync": lambda nbytes, stream: self._malloc(nbytes),
            "cudaFree": self._free,
            "cudaFreeAsync": lambda address, stream: self._free(address),
            "cudaMemcpy": lambda destination, source, count, kind: self._memcpy(destination, source, count),
            "cudaMemcpyAsync": lambda destination, source, count, kind, stream: self._memcpy(
                destination, source, count
            ),
        }.items():
            setattr(self, name, self._logged(name, call))

    def _logged(self, name: str, call: Any) -> Any:
        def logged(*args: Any) -> tuple[Any, ...]:
            self.calls.append((name, *args))
            return call(*args)

        return logged

    def _malloc(self, nbytes: int) -> tuple[Any, ...]:
        buffer = ctypes.create_string_buffer(nbytes)
        self.allocations[ctypes.addressof(buffer)] = buffer
        return (self.cudaError_t.cudaSuccess, ctypes.addressof(buffer))

    def _free(self, address: int) -> tuple[Any, ...]:
        if self.fail_free:
            return (self.cudaError_t.cudaErrorInvalidValue,)
        del self.allocations[address]
        return (self.cudaError_t.cudaSuccess,)

    def _memcpy(self, destination: int, source: int, count: int) -> tuple[Any, ...]:
        ctypes.memmove(destination, source, count)
        return (self.cudaError_t.cudaSuccess,)

    def cudaGetErrorName(self, error: Any) -> tuple[Any, ...]:
        return (self.cudaError_t.cudaSuccess, error.name.encode())

    def cudaGetErrorString(self, error: Any) -> tuple[Any, ...]:
        return (self.cudaError_t.cudaSuccess, b"invalid argument")

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [call for call in self.calls if call[0] == name]


@pytest.fixture
def fake_cudart(monkeypatch) -> FakeCudart:
    cudart = FakeCudart()
    monkeypatch.setattr(cuda_runtime, "load_cudart", lambda: cudart)
    return cudart


def test_cuda_allocation_is_stream_ordered_and_freed_on_the_stream_while_open(fake_cudart):
    memory = cuda_runtime.CudaRuntimeMemory()
    allocation = memory.allocate(256)
    assert fake_cudart.named("cudaMallocAsync") == [("cudaMallocAsync", 256, 77)]
    host = np.arange(64, dtype=np.float32)
    memory.copy_in(allocation.address, host)
    memory.synchronize()
    view = DeviceArray(allocation.address, (4, 16), "float32", allocation, copy_to_host=memory.copy_to_host)
    np.testing.assert_array_equal(view.rows(1, 2).to_host(), host[16:32][None])
    (copy,) = fake_cudart.named("cudaMemcpy")  # the read-back is a plain blocking cudaMemcpy, off the stream
    assert copy[2:] == (allocation.address + 64, 64, FakeCudart.cudaMemcpyKind.cudaMemcpyDeviceToHost)
    address = allocation.address
    del allocation, view
    gc.collect()
    assert fake_cudart.named("cudaFreeAsync") == [("cudaFreeAsync", address, 77)]
    assert fake_cudart.allocations == {}
    memory.close()


def test_cuda_allocations_outliving_close_stay_readable_and_are_freed_with_cuda_free(fake_cudart):
    """The order: close() waits for the stream and destroys it; a later release cannot use that stream, so it
    frees with cudaFree (which CUDA allows for cudaMallocAsync memory)."""
    memory = cuda_runtime.CudaRuntimeMemory()
    allocation = memory.allocate(16)
    memory.copy_in(allocation.address, np.arange(4, dtype=np.float32))
    memory.close()
    assert fake_cudart.named("cudaStreamDestroy") == [("cudaStreamDestroy", 77)]
    back = np.empty(4, np.float32)
    memory.copy_to_host(allocation.address, back)  # cudaMemcpy needs no stream
    np.testing.assert_array_equal(back, np.arange(4, dtype=np.float32))
    address = allocation.address
    del allocation
    gc.collect()
    assert fake_cudart.named("cudaFreeAsync") == []
    assert fake_cudart.named("cudaFree")[-1] == ("cudaFree", address)
    assert fake_cudart.allocations == {}
    with pytest.raises(EngineError, match="closed: no new allocations"):
        memory.allocate(16)


def test_cuda_release_failures_are_logged_not_raised(fake_cudart, caplog):
    memory = cuda_runtime.CudaRuntimeMemory()
    allocation = memory.allocate(16)
    fake_cudart.fail_free = True
    with caplog.at_level(logging.WARNING, logger="clipserve.engines"):
        allocation.free()  # a finalizer's exception would only reach stderr
    assert "cudaFreeAsync of device-resident embeddings" in caplog.text and "cudaErrorInvalidValue" in caplog.text


# ------------------------------------------------------------------------------------------ on a real GPU


def gpu_test(test: Any) -> Any:
    """The shared `requires_gpu` marks, on one test of a module that otherwise runs anywhere."""
    for mark in requires_gpu:
        test = mark(test)
    return test


@gpu_test
def test_cuda_allocation_round_trip_on_a_real_gpu():
    """Real cuda-bindings on a real GPU: an allocation written on the stream, read back through DeviceArray, freed on
    the stream, and one that outlives close() freed with cudaFree. (TensorRT itself is not on the GPU machine.)"""
    pytest.importorskip("cuda.bindings.runtime")
    memory = cuda_runtime.CudaRuntimeMemory()
    host = np.random.default_rng(0).standard_normal((300, 512)).astype(np.float32)
    survivor = None
    try:
        allocation = memory.allocate(host.nbytes)
        memory.copy_in(allocation.address, host)
        memory.synchronize()
        array = DeviceArray(allocation.address, host.shape, "float32", allocation, copy_to_host=memory.copy_to_host)
        np.testing.assert_array_equal(array.to_host(), host)
        np.testing.assert_array_equal(array.rows(17, 42).to_host(), host[17:42])
        del allocation, array  # freed with cudaFreeAsync on the stream
        gc.collect()
        survivor = memory.allocate(host.nbytes)
        memory.copy_in(survivor.address, host)
        memory.synchronize()
    finally:
        memory.close()
    assert survivor is not None
    back = np.empty_like(host)
    memory.copy_to_host(survivor.address, back)
    np.testing.assert_array_equal(back, host)
    survivor.free()  # after close: cudaFree
    assert not survivor.alive
