"""The similarity kernel's code on the host, for tests on machines without a GPU.

- `build_host_library` compiles tests/service/kernels/host_block.cu with nvcc as host code: the row algorithm of
  service/kernels/similarity.cuh run by a block of host threads (see that file).
- `HostRowKernel` calls it through ctypes.
- `HostMemoryDriver` is a fake of service.gpu.driver.CudaDriver at the GPU boundary: "device" memory is host
  memory, and launches run the host row kernel and a numpy GEMM in place of the CUDA kernels. It lets
  CudaSimilarity's real orchestration (grouping, the label LRU, dtype conversion, argument packing) run here.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from service.gpu.device_array import widen_to_float32
from service.gpu.driver import Float32, Int32, KernelArgument, Pointer
from service.kernels import KERNEL_DIR

HOST_SOURCE = Path(__file__).with_name("host_block.cu")
REQUIRE_NVCC = os.environ.get("CLIPSERVE_REQUIRE_NVCC") == "1"  # set by .ci/run: CI must compile the kernel


def nvcc_or_skip() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        message = "nvcc (the CUDA toolkit) is not installed; the kernel tests compile with it"
        if REQUIRE_NVCC:
            pytest.fail(message + " and CLIPSERVE_REQUIRE_NVCC=1")
        pytest.skip(message)
    return nvcc


def build_host_library(directory: Path) -> Path:
    output = directory / "libclipserve_host_kernels.so"
    command = [
        nvcc_or_skip(),
        "-x",
        "cu",
        "-std=c++20",
        "-O2",
        "-Xcompiler",
        "-fPIC,-Wall",
        "-shared",
        "-Werror",
        "all-warnings",
        "-I",
        str(KERNEL_DIR),
        str(HOST_SOURCE),
        "-o",
        str(output),
    ]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return output


_F32 = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
_I32 = np.ctypeslib.ndpointer(np.int32, flags="C_CONTIGUOUS")
_U32 = np.ctypeslib.ndpointer(np.uint32, flags="C_CONTIGUOUS")
_OUT_F = ctypes.POINTER(ctypes.c_float)
_OUT_U = ctypes.POINTER(ctypes.c_uint32)


class HostRowKernel:
    def __init__(self, library: Path) -> None:
        lib = self.lib = ctypes.CDLL(str(library))
        c_int, c_float, c_void = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
        lib.host_softmax_topk.argtypes = [
            c_void,
            c_int,
            c_int,
            c_int,
            c_int,
            c_float,
            c_float,
            c_int,
            c_int,
            c_void,
            c_void,
            c_void,
            c_void,
        ]
        lib.host_softmax_topk.restype = c_int
        lib.host_order_key.argtypes, lib.host_order_key.restype = [c_float], ctypes.c_uint32
        lib.host_softmax_push.argtypes = [_F32, c_int, _OUT_F, _OUT_F]
        lib.host_softmax_merge.argtypes = [c_float, c_float, c_float, c_float, _OUT_F, _OUT_F]
        lib.host_radix_select_bin.argtypes = [_U32, ctypes.c_uint32, _OUT_U, _OUT_U, _OUT_U]

    def softmax_topk_at(
        self,
        cosines: int,
        stride: int,
        rows: int,
        count: int,
        k: int,
        scale: float,
        bias: float,
        activation: int,
        threads: int,
        top_cosine: int,
        top_probability: int,
        top_index: int,
        probabilities: int,
    ) -> None:
        """The kernel's signature on raw addresses (0 for no full row)."""
        status = self.lib.host_softmax_topk(
            cosines,
            stride,
            rows,
            count,
            k,
            scale,
            bias,
            activation,
            threads,
            top_cosine,
            top_probability,
            top_index,
            probabilities or None,
        )
        if status != 0:
            raise ValueError(f"host_softmax_topk refused rows={rows} count={count} k={k} threads={threads}")

    def softmax_topk(
        self,
        cosines: np.ndarray,
        k: int,
        *,
        scale: float = 100.0,
        bias: float = 0.0,
        activation: int = 0,
        threads: int = 512,
        full_row: bool = False,
    ):  # type: ignore[no-untyped-def]
        cosines = np.ascontiguousarray(cosines, dtype=np.float32)
        rows, count = cosines.shape
        top_cosine = np.zeros((rows, k), np.float32)
        top_probability = np.zeros((rows, k), np.float32)
        top_index = np.full((rows, k), -1, np.int32)
        probabilities = np.zeros((rows, count), np.float32) if full_row else None
        self.softmax_topk_at(
            cosines.ctypes.data,
            count,
            rows,
            count,
            k,
            scale,
            bias,
            activation,
            threads,
            top_cosine.ctypes.data,
            top_probability.ctypes.data,
            top_index.ctypes.data,
            probabilities.ctypes.data if probabilities is not None else 0,
        )
        return top_cosine, top_probability, top_index, probabilities

    def order_key(self, x: float) -> int:
        return int(self.lib.host_order_key(x))

    def softmax_push(self, logits: np.ndarray) -> tuple[float, float]:
        top, total = ctypes.c_float(), ctypes.c_float()
        values = np.ascontiguousarray(logits, dtype=np.float32)
        self.lib.host_softmax_push(values, len(values), ctypes.byref(top), ctypes.byref(total))
        return top.value, total.value

    def softmax_merge(self, a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
        top, total = ctypes.c_float(), ctypes.c_float()
        self.lib.host_softmax_merge(*a, *b, ctypes.byref(top), ctypes.byref(total))
        return top.value, total.value

    def radix_select_bin(self, histogram: np.ndarray, k: int) -> tuple[int, int, int]:
        out = [ctypes.c_uint32() for _ in range(3)]
        self.lib.host_radix_select_bin(np.ascontiguousarray(histogram, np.uint32), k, *map(ctypes.byref, out))
        return tuple(int(o.value) for o in out)  # type: ignore[return-value]


class HostAllocation:
    """Host bytes posing as a cuMemAlloc allocation, aligned to 256 bytes as those are."""

    def __init__(self, driver: HostMemoryDriver, nbytes: int) -> None:
        self.buffer = np.zeros(max(nbytes, 1) + 256, np.uint8)
        offset = -self.buffer.ctypes.data % 256
        self.pointer, self.nbytes = self.buffer.ctypes.data + offset, nbytes
        self._driver = driver
        driver.live[self.pointer] = self

    def free(self) -> None:
        if self._driver.live.pop(self.pointer, None) is not None:
            self._driver.freed += 1


def _view(pointer: int, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    count = int(np.prod(shape))
    raw = (ctypes.c_char * (count * np.dtype(dtype).itemsize)).from_address(pointer)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


class HostMemoryDriver:
    """Fake CudaDriver (the GPU boundary): host memory and host implementations of the kernels."""

    # kernel -> (input dtype, labels with residual halves, images per GEMM tile)
    _GEMMS: ClassVar[dict[str, tuple[str, bool, int]]] = {
        "clipserve_cosines_f32": ("float32", False, 64),
        "clipserve_cosines_f16": ("float16", True, 128),
        "clipserve_cosines_bf16": ("bfloat16", True, 128),
        "clipserve_cosines_f16_single": ("float16", False, 128),
        "clipserve_cosines_bf16_single": ("bfloat16", False, 128),
    }

    def __init__(self, rows: HostRowKernel, threads: int = 512) -> None:
        self.rows, self.threads = rows, threads
        self.live: dict[int, HostAllocation] = {}
        self.freed = 0
        self.launches: list[tuple[str, tuple[int, int], int]] = []
        self.uploads = 0
        self.loaded: tuple[str, ...] = ()

    device = 0
    stream_handle = 0

    def make_current(self) -> None:
        pass

    def room_at(self, pointer: int) -> int:
        """Bytes from `pointer` to the end of the (fake) allocation holding it."""
        for allocation in self.live.values():
            if allocation.pointer <= pointer < allocation.pointer + max(allocation.nbytes, 1):
                return allocation.pointer + allocation.nbytes - pointer
        raise AssertionError(f"{pointer:#x} is in no device allocation")

    def l2_cache_bytes(self) -> int:
        return 0  # no L2 bound: the tests set the workspace bound themselves

    def load_kernels(self, image: bytes, names: tuple[str, ...]) -> None:
        assert image, "empty fatbin"
        self.loaded = tuple(names)

    def allocate(self, nbytes: int) -> HostAllocation:
        return HostAllocation(self, nbytes)

    def upload(self, pointer: int, array: np.ndarray) -> None:
        self.uploads += 1
        host = np.ascontiguousarray(array)
        ctypes.memmove(pointer, host.ctypes.data, host.nbytes)

    def download(self, pointer: int, out: np.ndarray) -> None:
        ctypes.memmove(out.ctypes.data, pointer, out.nbytes)

    def launch(self, name: str, grid: tuple[int, int], block: int, arguments: list[KernelArgument]) -> None:
        assert name in self.loaded, f"{name} was not loaded"
        assert all(isinstance(a, Pointer | Int32 | Float32) for a in arguments)
        self.launches.append((name, grid, block))
        if name in self._GEMMS:
            images, labels, rows, count, dim, out, stride = (int(a) for a in arguments)
            dtype, residuals, image_tile = self._GEMMS[name]
            assert stride >= count and stride % 64 == 0 and block == 256
            assert grid == (-(-rows // image_tile), -(-count // 64))  # image tiles on x
            # The GEMM may store whole tiles: the workspace must hold them, 256-byte aligned (the WMMA stores
            # need 32), and the label buffer must hold the layout the kernel reads.
            tile_bytes = grid[0] * image_tile * stride * 4
            assert self.room_at(out) >= tile_bytes and out % 256 == 0
            assert self.room_at(labels) >= (2 if residuals else 1) * count * dim * (4 if dtype == "float32" else 2)
            _view(out, (tile_bytes // 4,), np.float32)[:] = np.nan  # padding read by mistake would show
            raw = np.float32 if dtype == "float32" else (np.float16 if dtype == "float16" else np.uint16)

            def read(pointer: int, n: int) -> np.ndarray:
                bits = _view(pointer, (n, dim), raw)
                return widen_to_float32(bits.view(np.uint16), dtype) if dtype != "float32" else bits.copy()

            if residuals:  # [2C, D]: rounded labels, then the residuals of that rounding (similarity.cu)
                both = read(labels, 2 * count)
                label_matrix = both[:count] + both[count:]
            else:
                label_matrix = read(labels, count)
            _view(out, (rows, stride), np.float32)[:, :count] = read(images, rows) @ label_matrix.T
            return
        cosines, stride, rows, count, k, scale, bias, activation, top_c, top_p, top_i, full = arguments
        assert grid == (rows, 1) and block == 512 and int(stride) % 64 == 0
        for output in (top_c, top_p, top_i):
            assert self.room_at(int(output)) >= int(rows) * int(k) * 4
        assert self.room_at(int(cosines)) >= int(rows) * int(stride) * 4
        self.rows.softmax_topk_at(
            int(cosines),
            int(stride),
            int(rows),
            int(count),
            int(k),
            float(scale),
            float(bias),
            int(activation),
            self.threads,
            int(top_c),
            int(top_p),
            int(top_i),
            int(full),
        )


class FakeCublas:
    """libcublas at the GPU boundary: cublasGemmEx computed in numpy on host memory, by the BLAS definition
    (column-major storage, C = alpha * op(A) @ op(B) + beta * C), so CublasGemm's transposes, leading dimensions
    and the residual pass are checked against the documented semantics rather than against themselves."""

    _DTYPES: ClassVar[dict[int, str]] = {0: "float32", 2: "float16", 14: "bfloat16"}

    def __init__(self) -> None:
        self.calls: list[dict[str, int | float]] = []
        self.destroyed = 0

    def cublasCreate_v2(self, handle: object) -> int:  # the C names
        handle._obj.value = 0x1234  # type: ignore[attr-defined]  # ctypes.byref(c_void_p) from CublasGemm
        return 0

    def cublasSetStream_v2(self, handle: object, stream: object) -> int:
        return 0

    def cublasDestroy_v2(self, handle: object) -> int:
        self.destroyed += 1
        return 0

    @staticmethod
    def _value(argument: object) -> int:
        return int(getattr(argument, "value", argument) or 0)

    def _matrix(self, pointer: int, dtype_code: int, columns: int, rows: int, ld: int) -> np.ndarray:
        """A column-major rows x columns matrix at `pointer` with leading dimension ld, as float32."""
        dtype = self._DTYPES[dtype_code]
        raw = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[dtype]
        memory = _view(pointer, (columns, ld), raw)[:, :rows]
        values = memory.copy() if dtype == "float32" else widen_to_float32(memory.view(np.uint16), dtype)
        return values.T  # row i, column j

    def cublasGemmEx(
        self,
        handle,
        transa,
        transb,
        m,
        n,
        k,
        alpha,
        a,
        a_type,
        lda,
        b,
        b_type,
        ldb,
        beta,
        c,
        c_type,
        ldc,
        compute,
        algo,
    ) -> int:  # type: ignore[no-untyped-def]
        m, n, k = self._value(m), self._value(n), self._value(k)
        lda, ldb, ldc = self._value(lda), self._value(ldb), self._value(ldc)
        alpha_value, beta_value = alpha._obj.value, beta._obj.value  # ctypes.byref(c_float)
        # op(A) is m x k: stored k x m when transposed, else m x k.
        op_a = (
            self._matrix(self._value(a), a_type, m, k, lda).T
            if transa == 1
            else self._matrix(self._value(a), a_type, k, m, lda)
        )
        op_b = (
            self._matrix(self._value(b), b_type, k, n, ldb).T
            if transb == 1
            else self._matrix(self._value(b), b_type, n, k, ldb)
        )
        assert c_type == 0 and ldc >= m
        stored = _view(self._value(c), (n, ldc), np.float32)  # column j of C is stored[j, :m]
        result = alpha_value * (op_a @ op_b) + (beta_value * stored[:, :m].T if beta_value else 0.0)
        stored[:, :m] = result.T
        self.calls.append({"m": m, "n": n, "k": k, "beta": beta_value, "compute": int(compute)})
        return 0
