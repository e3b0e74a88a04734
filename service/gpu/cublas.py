"""The cosine GEMM through cuBLAS (`cublasGemmEx`), called with ctypes on raw device pointers.

The similarity step is a GEMM followed by the fused softmax + top-k row kernel (service/kernels). cuBLAS's
GEMMs use each GPU's own tensor-core instructions (wgmma and TMA on Hopper), which a portable WMMA kernel does
not; where libcublas is present (CUDA runtime images and torch's wheels carry it) it is the faster first half,
and the WMMA kernel in similarity.cu is the fallback. Loaded through cuda-pathfinder (part of cuda-bindings),
which finds NVIDIA's libraries in site-packages or the CUDA toolkit; nothing here needs torch.

cuBLAS is column-major: the row-major workspace cosines[B, C] (rows `stride` floats apart) is, to it, the
column-major C x B matrix with leading dimension `stride`, and the row-major labels [C, D] the column-major D x C
matrix with leading dimension D. So cosines = labels^T(op T) x images(op N), m = C, n = B, k = D.
"""

from __future__ import annotations

import ctypes
from typing import Any

from service.gpu.driver import CudaError, GpuUnavailable

# library_types.h and cublas_api.h (CUDA 12 and 13 alike).
CUDA_DATA_TYPES = {"float32": 0, "float16": 2, "bfloat16": 14}  # CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
# fp16/bf16 inputs: fp32 accumulation on tensor cores. fp32 inputs: pedantic, so no TF32 (CPU-path parity).
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_PEDANTIC = 68, 69
CUBLAS_GEMM_DEFAULT = -1
CUBLAS_STATUS_SUCCESS = 0


def load_cublas() -> Any:
    """libcublas as a ctypes library, or GpuUnavailable saying why not."""
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        return ctypes.CDLL(load_nvidia_dynamic_lib("cublas").abs_path)
    except (ImportError, OSError, RuntimeError) as error:  # pathfinder's not-found errors are RuntimeErrors
        raise GpuUnavailable(f"libcublas cannot be loaded ({error})") from error


class CublasGemm:
    """One cuBLAS handle bound to the similarity step's stream; calls come from one thread at a time."""

    def __init__(self, stream: int, library: Any = None) -> None:
        self._lib = lib = library if library is not None else load_cublas()
        handle = ctypes.c_void_p()
        self._check("cublasCreate_v2", lib.cublasCreate_v2(ctypes.byref(handle)))
        self._handle: ctypes.c_void_p | None = handle
        self._check("cublasSetStream_v2", lib.cublasSetStream_v2(handle, ctypes.c_void_p(stream)))

    def _check(self, what: str, status: int) -> None:
        if status != CUBLAS_STATUS_SUCCESS:
            name = f"status {status}"
            namer = getattr(self._lib, "cublasGetStatusName", None)
            if namer is not None:
                namer.restype = ctypes.c_char_p
                name = (namer(status) or b"").decode() or name
            raise CudaError(f"cuBLAS {what} failed: {name}")

    def cosines(
        self,
        images: int,
        labels: int,
        dtype: str,
        rows: int,
        count: int,
        dim: int,
        out: int,
        stride: int,
        *,
        residuals: int = 0,
    ) -> None:
        """out[r, c] = images[r] . labels[c] (+ residuals[c] when given: the small part first, then added to)."""
        data_type = CUDA_DATA_TYPES[dtype]
        compute = CUBLAS_COMPUTE_32F_PEDANTIC if dtype == "float32" else CUBLAS_COMPUTE_32F
        one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
        passes = [(residuals, zero), (labels, one)] if residuals else [(labels, zero)]
        for matrix, beta in passes:
            status = self._lib.cublasGemmEx(
                self._handle,
                CUBLAS_OP_T,
                CUBLAS_OP_N,
                ctypes.c_int(count),
                ctypes.c_int(rows),
                ctypes.c_int(dim),
                ctypes.byref(one),
                ctypes.c_void_p(matrix),
                data_type,
                ctypes.c_int(dim),
                ctypes.c_void_p(images),
                data_type,
                ctypes.c_int(dim),
                ctypes.byref(beta),
                ctypes.c_void_p(out),
                CUDA_DATA_TYPES["float32"],
                ctypes.c_int(stride),
                compute,
                CUBLAS_GEMM_DEFAULT,
            )
            self._check("cublasGemmEx", status)

    def close(self) -> None:
        if self._handle is not None:
            self._lib.cublasDestroy_v2(self._handle)
            self._handle = None
