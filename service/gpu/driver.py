"""The CUDA driver API through NVIDIA's `cuda-bindings`: context, memory, copies and kernel launches.

The similarity kernel is a fatbin loaded with cuModuleLoadData and launched with cuLaunchKernel on raw device
addresses, so it works on memory owned by any runtime in the process (TensorRT, ONNX Runtime, torch, CuPy): all
of them use the device's primary context, which `CudaDriver` retains and makes current on each calling thread.
cuda-bindings is imported on first use; without it (or without a GPU) a `GpuUnavailable` says what is missing.
Every call returns ``(error, *values)``; `_check` turns an error into GpuUnavailable (no device, no driver) or
`CudaError` (anything else), naming the call.
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

GPU_EXTRA = "pip install 'clipserve[gpu]'"


# Driver errors that mean "no usable GPU here" rather than a failed call (names as cuda-bindings spells them;
# looked up by name, since not every bindings release has all of them).
_UNAVAILABLE = (
    "CUDA_ERROR_NO_DEVICE",
    "CUDA_ERROR_STUB_LIBRARY",
    "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
    "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE",
    "CUDA_ERROR_DEVICE_UNAVAILABLE",
)


class CudaError(RuntimeError):
    """A CUDA driver call failed."""


class GpuUnavailable(CudaError):
    """No usable GPU here: cuda-bindings missing, no driver, or no device."""


def load_bindings() -> ModuleType:
    try:
        from cuda.bindings import driver
    except (ImportError, OSError) as error:
        raise GpuUnavailable(
            f"the CUDA similarity kernel needs NVIDIA's CUDA Python bindings (cuda-bindings), which cannot be "
            f"imported here ({error}); run {GPU_EXTRA}"
        ) from error
    return driver


# Kernel arguments are typed so that each is packed at the size the kernel's signature expects.
class Pointer(int):
    """A device address argument (64-bit)."""


class Int32(int):
    """A 32-bit int argument."""


class Float32(float):
    """A 32-bit float argument."""


KernelArgument = Pointer | Int32 | Float32


_ARGUMENT_TYPES: dict[type, Any] = {Pointer: ctypes.c_uint64, Int32: ctypes.c_int32, Float32: ctypes.c_float}


def pack_arguments(arguments: Sequence[KernelArgument]) -> tuple[Any, list[Any]]:
    """cuLaunchKernel's `kernelParams`: an array of addresses, each of one argument's bytes (kept alive by the
    returned holders until the launch call returns; the driver copies the values at launch). ctypes scalars,
    not numpy arrays: this runs twice per scored batch, and they cost a fraction as much to make."""
    holders: list[Any] = []
    for argument in arguments:
        kind = _ARGUMENT_TYPES.get(type(argument))
        if kind is None:
            raise TypeError(f"kernel argument {argument!r} must be a Pointer, Int32 or Float32")
        holders.append(kind(argument))
    return (ctypes.c_void_p * len(holders))(*map(ctypes.addressof, holders)), holders


class DeviceAllocation:
    """cuMemAlloc'd bytes, freed once: by `free()` or when the object is garbage collected."""

    def __init__(self, driver: CudaDriver, pointer: int, nbytes: int) -> None:
        self.pointer, self.nbytes = pointer, nbytes
        self._finalizer = weakref.finalize(self, driver.free, pointer)

    def free(self) -> None:
        self._finalizer()


class CudaDriver:
    """One device's primary context, the kernels loaded into it, and blocking copies on one stream."""

    def __init__(self, device: int = 0) -> None:
        self._cuda = cuda = load_bindings()
        try:
            initialised = cuda.cuInit(0)
        except RuntimeError as error:  # cuda-bindings finds no libcuda (no NVIDIA driver installed)
            raise GpuUnavailable(f"the NVIDIA driver library cannot be loaded ({error})") from error
        self._check("cuInit", initialised)
        self.device = device
        self._device = self._check("cuDeviceGet", cuda.cuDeviceGet(device))
        self._context = self._check("cuDevicePrimaryCtxRetain", cuda.cuDevicePrimaryCtxRetain(self._device))
        self.make_current()
        # Non-blocking: it does not wait for work other libraries put on the legacy default stream.
        self._stream = self._check("cuStreamCreate", cuda.cuStreamCreate(cuda.CUstream_flags.CU_STREAM_NON_BLOCKING))
        self._functions: dict[str, Any] = {}
        self._modules: list[Any] = []
        self._lock = threading.Lock()

    def _check(self, what: str, result: tuple[Any, ...]) -> Any:
        cuda = self._cuda
        error, *values = result
        if error != cuda.CUresult.CUDA_SUCCESS:
            _, name = cuda.cuGetErrorName(error)
            _, text = cuda.cuGetErrorString(error)
            message = f"CUDA {what} failed: {_text(name)} ({_text(text)})"
            unavailable = {getattr(cuda.CUresult, name) for name in _UNAVAILABLE if hasattr(cuda.CUresult, name)}
            if error in unavailable:
                raise GpuUnavailable(message + "; the CUDA similarity kernel needs an NVIDIA GPU and driver")
            raise CudaError(message)
        if not values:
            return None
        return values[0] if len(values) == 1 else tuple(values)

    @property
    def stream_handle(self) -> int:
        """The stream every copy and launch of this driver goes on (for libraries that take a cudaStream_t)."""
        return int(self._stream)

    def make_current(self) -> None:
        """Bind the primary context to the calling thread (the batcher, the decode pool, ... each call this)."""
        self._check("cuCtxSetCurrent", self._cuda.cuCtxSetCurrent(self._context))

    def l2_cache_bytes(self) -> int:
        cuda = self._cuda
        attribute = cuda.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE
        return int(self._check("cuDeviceGetAttribute", cuda.cuDeviceGetAttribute(attribute, self._device)))

    def compute_capability(self) -> str:
        cuda = self._cuda
        attribute = cuda.CUdevice_attribute
        major = self._check(
            "cuDeviceGetAttribute",
            cuda.cuDeviceGetAttribute(attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self._device),
        )
        minor = self._check(
            "cuDeviceGetAttribute",
            cuda.cuDeviceGetAttribute(attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self._device),
        )
        return f"{major}.{minor}"

    def load_kernels(self, image: bytes, names: Sequence[str]) -> None:
        """Load a fatbin (or cubin/PTX) and look up its entry points by their C names."""
        self.make_current()
        buffer = np.frombuffer(image, dtype=np.uint8)
        module = self._check("cuModuleLoadData", self._cuda.cuModuleLoadData(buffer.ctypes.data))
        self._modules.append(module)
        for name in names:
            self._functions[name] = self._check(
                f"cuModuleGetFunction({name})", self._cuda.cuModuleGetFunction(module, name.encode())
            )

    def launch(self, name: str, grid: tuple[int, int], block: int, arguments: Sequence[KernelArgument]) -> None:
        """Queue kernel `name` on this driver's stream (static shared memory only)."""
        function = self._functions[name]
        params, _holders = pack_arguments(arguments)
        self._check(
            f"cuLaunchKernel({name})",
            self._cuda.cuLaunchKernel(
                function, grid[0], grid[1], 1, block, 1, 1, 0, self._stream, ctypes.addressof(params), 0
            ),
        )

    def allocate(self, nbytes: int) -> DeviceAllocation:
        self.make_current()
        pointer = self._check("cuMemAlloc", self._cuda.cuMemAlloc(max(nbytes, 1)))
        return DeviceAllocation(self, int(pointer), nbytes)

    def free(self, pointer: int) -> None:
        # Runs from garbage collection on any thread, possibly at interpreter exit: best effort, never raises.
        # Work queued on the stream may still use the memory, so it finishes first.
        cuda = self._cuda
        cuda.cuCtxSetCurrent(self._context)
        cuda.cuStreamSynchronize(self._stream)
        cuda.cuMemFree(pointer)

    def upload(self, pointer: int, array: np.ndarray) -> None:
        """Host -> device, queued on the stream (ordered before later launches)."""
        host = np.ascontiguousarray(array)
        self._check(
            "cuMemcpyHtoDAsync", self._cuda.cuMemcpyHtoDAsync(pointer, host.ctypes.data, host.nbytes, self._stream)
        )
        # A pageable source is staged before the call returns, but be explicit: `host` may be a temporary.
        self.synchronize()

    def download(self, pointer: int, out: np.ndarray) -> None:
        """Device -> host into `out` (C-contiguous), after everything queued on the stream."""
        self._check(
            "cuMemcpyDtoHAsync", self._cuda.cuMemcpyDtoHAsync(out.ctypes.data, pointer, out.nbytes, self._stream)
        )
        self.synchronize()

    def synchronize(self) -> None:
        self._check("cuStreamSynchronize", self._cuda.cuStreamSynchronize(self._stream))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_default: CudaDriver | None = None
_default_lock = threading.Lock()


def default_driver() -> CudaDriver:
    """The process's driver for device 0, created on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = CudaDriver()
        return _default


def copy_to_host(pointer: int, out: np.ndarray) -> None:
    """DeviceArray's default copy: device bytes at `pointer` into `out`."""
    driver = default_driver()
    driver.make_current()
    driver.download(pointer, out)
