"""service/gpu/driver.py without a GPU: argument packing, error mapping, and what a machine without one says.

cuda-bindings itself is installed here (torch's CUDA wheels bring it), but there is no NVIDIA driver: the real
module is used where a call needs no driver, and a stand-in carries the real CUresult enum where it would.
"""

from __future__ import annotations

import ctypes
import types

import pytest

from service.gpu import driver as gpu_driver
from service.gpu.driver import CudaDriver, CudaError, Float32, GpuUnavailable, Int32, Pointer, pack_arguments
from tests.gpu import cuda_available


def test_arguments_are_packed_at_the_kernel_signature_sizes() -> None:
    params, holders = pack_arguments([Pointer(0xDEADBEEF000), Int32(-7), Float32(2.5)])
    assert len(params) == 3 and ctypes.sizeof(params) == 3 * 8  # void*[3]
    values = [
        ctypes.c_uint64.from_address(params[0]).value,
        ctypes.c_int32.from_address(params[1]).value,
        ctypes.c_float.from_address(params[2]).value,
    ]
    assert values == [0xDEADBEEF000, -7, 2.5]
    assert [ctypes.sizeof(holder) for holder in holders] == [8, 4, 4]
    with pytest.raises(TypeError, match="Pointer, Int32 or Float32"):
        pack_arguments([3])  # type: ignore[list-item]


def stand_in_bindings() -> types.SimpleNamespace:
    driver = pytest.importorskip("cuda.bindings.driver")

    def name(error):  # type: ignore[no-untyped-def]
        return driver.CUresult.CUDA_SUCCESS, error.name.encode()

    def text(error):  # type: ignore[no-untyped-def]
        return driver.CUresult.CUDA_SUCCESS, b"explanation"

    return types.SimpleNamespace(CUresult=driver.CUresult, cuGetErrorName=name, cuGetErrorString=text)


def checker() -> CudaDriver:
    instance = object.__new__(CudaDriver)
    instance._cuda = stand_in_bindings()  # type: ignore[attr-defined]
    return instance


def test_errors_name_the_call_and_cuda_s_reason() -> None:
    cuda = checker()
    result = cuda._cuda.CUresult  # type: ignore[attr-defined]
    with pytest.raises(CudaError, match=r"cuModuleLoadData failed: CUDA_ERROR_NO_BINARY_FOR_GPU \(explanation\)"):
        cuda._check("cuModuleLoadData", (result.CUDA_ERROR_NO_BINARY_FOR_GPU,))
    with pytest.raises(GpuUnavailable, match="needs an NVIDIA GPU"):
        cuda._check("cuInit", (result.CUDA_ERROR_NO_DEVICE,))
    assert cuda._check("cuMemAlloc", (result.CUDA_SUCCESS, 1234)) == 1234
    assert cuda._check("cuMemFree", (result.CUDA_SUCCESS,)) is None


def test_every_unavailable_name_is_checked_against_the_installed_bindings() -> None:
    cuda = checker()
    result = cuda._cuda.CUresult  # type: ignore[attr-defined]
    known = [name for name in gpu_driver._UNAVAILABLE if hasattr(result, name)]
    assert "CUDA_ERROR_NO_DEVICE" in known
    for name in known:
        with pytest.raises(GpuUnavailable):
            cuda._check("cuInit", (getattr(result, name),))


@pytest.mark.skipif(cuda_available(), reason="this machine has a GPU")
def test_a_machine_without_a_gpu_gets_gpu_unavailable() -> None:
    pytest.importorskip("cuda.bindings.driver")
    with pytest.raises(GpuUnavailable):
        CudaDriver()


def test_without_the_bindings_the_error_says_how_to_install_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_cuda(name, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name.startswith("cuda"):
            raise ImportError("No module named 'cuda'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cuda)
    with pytest.raises(GpuUnavailable, match=r"clipserve\[gpu\]"):
        gpu_driver.load_bindings()
