"""Device memory and a CUDA stream for the TensorRT engine, through NVIDIA's CUDA Python runtime bindings.

`cuda-bindings` (``cuda.bindings.runtime``) is what TensorRT's own Python samples use for buffers and streams. It
is a few MB, where torch is gigabytes, so the GPU install and image stay torch-free like the rest of the serving
path. Every call returns ``(error, *values)``; `_check` turns an error into an EngineError that says what failed.

The module imports the bindings only when memory is first asked for, so the service imports without them.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from service.engines.base import EngineError

log = logging.getLogger("clipserve.engines")

GPU_EXTRA = "pip install 'clipserve[gpu]'"


def load_cudart() -> ModuleType:
    """`cuda.bindings.runtime`, or an EngineError saying how to get it."""
    try:
        from cuda.bindings import runtime
    except (ImportError, OSError) as error:
        raise EngineError(
            f"the TensorRT engine needs NVIDIA's CUDA Python bindings (cuda-bindings), which cannot be imported "
            f"here ({error}); run {GPU_EXTRA}"
        ) from error
    return runtime


def _cuda_versions(cudart: ModuleType) -> str:
    """ "runtime 13.0, driver 12.4": what a version mismatch between the bindings and the driver looks like."""

    def version(call: Any) -> str:
        error, value = call()
        if error != cudart.cudaError_t.cudaSuccess or not value:
            return "none"
        return f"{value // 1000}.{value % 1000 // 10}"

    return f"runtime {version(cudart.cudaRuntimeGetVersion)}, driver {version(cudart.cudaDriverGetVersion)}"


def _check(cudart: ModuleType, what: str, result: tuple[Any, ...]) -> Any:
    """The value(s) of a cuda-bindings call, or an EngineError naming the call and CUDA's own explanation."""
    error, *values = result
    if error != cudart.cudaError_t.cudaSuccess:
        _, name = cudart.cudaGetErrorName(error)
        _, text = cudart.cudaGetErrorString(error)
        hint = ""
        if error == cudart.cudaError_t.cudaErrorNoDevice:
            hint = "; the TensorRT engine needs an NVIDIA GPU, else use CLIPSERVE_ENGINE=onnxruntime"
        elif error == cudart.cudaError_t.cudaErrorInsufficientDriver:
            # No driver at all, or one older than the CUDA major that these bindings were built for.
            hint = (
                f" (CUDA {_cuda_versions(cudart)}); the TensorRT engine needs an NVIDIA GPU and a driver at least as "
                "new as the runtime: install the cuda-bindings major version that matches the driver (e.g. "
                "'cuda-bindings<13' for a CUDA 12 driver), or use CLIPSERVE_ENGINE=onnxruntime"
            )
        raise EngineError(f"CUDA {what} failed: {name.decode()} ({text.decode()}){hint}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def compute_capability(device: int = 0) -> str:
    """Compute capability of CUDA device `device`, e.g. "9.0": the key for picking a TensorRT build."""
    cudart = load_cudart()
    major, minor = (
        _check(cudart, "cudaDeviceGetAttribute", cudart.cudaDeviceGetAttribute(attribute, device))
        for attribute in (
            cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor,
            cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor,
        )
    )
    return f"{major}.{minor}"


class DeviceAllocation:
    """Device memory owned by this object: `release(address)` runs once, when it is collected or `free()` is called.

    It is what a `DeviceArray` keeps as its owner, so the memory lives exactly as long as the last view of it.
    """

    def __init__(self, address: int, nbytes: int, release: Callable[[int], None]) -> None:
        self.address = address
        self.nbytes = nbytes
        # `release` must not refer to this object, or it would never be collected; finalize also runs it once only.
        self._finalizer = weakref.finalize(self, release, address)
        # At interpreter exit the CUDA context is being torn down with the process: nothing to hand back then.
        self._finalizer.atexit = False

    @property
    def alive(self) -> bool:
        return self._finalizer.alive

    def free(self) -> None:
        self._finalizer()

    def __repr__(self) -> str:
        return f"DeviceAllocation(0x{self.address:x}, {self.nbytes} bytes{'' if self.alive else ', freed'})"


class CudaRuntimeMemory:
    """`DeviceMemory` (see service.engines.tensorrt) on cudaMalloc'd buffers and one CUDA stream.

    Buffers are kept per slot ("input", "output") and only grow, so a steady stream of batches allocates nothing.
    `allocate` is for memory that leaves the engine (device-resident embeddings): stream-ordered (cudaMallocAsync
    from the device's pool, so no device-wide sync per batch) and freed when its owner is collected. The engine
    calls this from whichever worker thread runs the batch; all of them use device 0, the CUDA runtime's default,
    so no per-thread cudaSetDevice is needed.
    """

    def __init__(self, device: int = 0) -> None:
        self._cudart = cudart = load_cudart()
        _check(cudart, "cudaSetDevice", cudart.cudaSetDevice(device))
        self._stream = _check(cudart, "cudaStreamCreate", cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, int]] = {}  # slot -> (device address, bytes)
        self._closed = False
        # Allocations are released from finalizers, on whichever thread drops the last view, possibly while this
        # thread is inside close(): reentrant, so a finalizer run by the garbage collector mid-close cannot deadlock.
        self._lock = threading.RLock()

    @property
    def stream_handle(self) -> int:
        return int(self._stream)

    def buffer(self, slot: str, nbytes: int) -> int:
        address, size = self._buffers.get(slot, (0, 0))
        if nbytes > size:
            cudart = self._cudart
            if address:
                # The stream may still read the old buffer: let it finish before the memory is handed back.
                _check(cudart, "cudaStreamSynchronize", cudart.cudaStreamSynchronize(self._stream))
                _check(cudart, "cudaFree", cudart.cudaFree(address))
                self._buffers.pop(slot)
            address = int(_check(cudart, "cudaMalloc", cudart.cudaMalloc(nbytes)))
            self._buffers[slot] = (address, nbytes)
        return address

    def allocate(self, nbytes: int) -> DeviceAllocation:
        """`nbytes` of device memory, usable on this stream at once and elsewhere after `synchronize()`."""
        cudart = self._cudart
        with self._lock:
            if self._closed:
                raise EngineError("CUDA device memory is closed: no new allocations")
            address = int(_check(cudart, "cudaMallocAsync", cudart.cudaMallocAsync(nbytes, self._stream)))
        return DeviceAllocation(address, nbytes, self._release)

    def _release(self, address: int) -> None:
        # Called by a finalizer, so it logs instead of raising (an exception there only reaches stderr).
        cudart = self._cudart
        with self._lock:
            if self._closed:
                # The stream is gone (close waited for it first). CUDA allows cudaFree on pool memory from
                # cudaMallocAsync; it waits for the device, but only views that outlive their engine pay for that.
                what, result = "cudaFree", cudart.cudaFree(address)
            else:
                # Ordered after everything already queued on this stream. Work on other streams (the similarity
                # kernel) must be finished by whoever held the view: dropping it is the promise that it is.
                what, result = "cudaFreeAsync", cudart.cudaFreeAsync(address, self._stream)
        if result[0] != cudart.cudaError_t.cudaSuccess:
            _, name = cudart.cudaGetErrorName(result[0])
            log.warning("CUDA %s of device-resident embeddings at 0x%x failed: %s", what, address, name.decode())

    def copy_in(self, address: int, array: np.ndarray) -> None:
        # From pageable memory, cudaMemcpyAsync returns once the bytes are staged, so `array` may go after it.
        cudart = self._cudart
        host = np.ascontiguousarray(array)
        kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        copy = cudart.cudaMemcpyAsync(address, host.ctypes.data, host.nbytes, kind, self._stream)
        _check(cudart, "cudaMemcpyAsync", copy)

    def copy_out(self, address: int, out: np.ndarray) -> None:
        cudart = self._cudart
        kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        copy = cudart.cudaMemcpyAsync(out.ctypes.data, address, out.nbytes, kind, self._stream)
        _check(cudart, "cudaMemcpyAsync", copy)
        _check(cudart, "cudaStreamSynchronize", cudart.cudaStreamSynchronize(self._stream))

    def synchronize(self) -> None:
        _check(self._cudart, "cudaStreamSynchronize", self._cudart.cudaStreamSynchronize(self._stream))

    def copy_to_host(self, pointer: int, out: np.ndarray) -> None:
        """Blocking device -> host copy outside this stream (cudaMemcpy), so it also works after close()."""
        cudart = self._cudart
        kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(cudart, "cudaMemcpy", cudart.cudaMemcpy(out.ctypes.data, pointer, out.nbytes, kind))

    def close(self) -> None:
        # Allocations handed out stay valid: they belong to the device's pool, not to the stream, and are freed with
        # cudaFree by their owners' finalizers once `_closed` is set (see _release).
        with self._lock:
            if self._closed:
                return
            self._closed = True
            cudart = self._cudart
            cudart.cudaStreamSynchronize(self._stream)
            for address, _ in self._buffers.values():
                cudart.cudaFree(address)
            self._buffers.clear()
            cudart.cudaStreamDestroy(self._stream)
