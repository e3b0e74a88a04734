"""The CUDA similarity kernel's sources and its ahead-of-time build (`python -m service.kernels.build`).

similarity.cuh holds the per-row logic (softmax, radix top-k) as __host__ __device__ code; similarity.cu the
GEMM and the entry points. nvcc compiles them into one fatbin with machine code for each GPU family we support
and PTX for newer ones; service/gpu/similarity.py loads it through the CUDA driver API. No torch, no nvcc at
serving time: only the fatbin and cuda-bindings.
"""

from __future__ import annotations

from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent
SOURCE = KERNEL_DIR / "similarity.cu"
HEADER = KERNEL_DIR / "similarity.cuh"
DEFAULT_FATBIN = KERNEL_DIR / "similarity.fatbin"

# Ampere (A100, A10/A40, L4/L40 = sm_89), Hopper (H100/H200), Blackwell (B200). CUDA 13 dropped everything
# before sm_75, and sm_75 (T4) lacks the bf16 tensor-core instructions the fp16/bf16 GEMM uses.
ARCHITECTURES = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_100")
# PTX of the newest listed family, which the driver compiles at load time on GPUs newer than all of the above.
PTX_ARCHITECTURE = "compute_100"

ENTRY_POINTS = (
    "clipserve_cosines_f32",
    "clipserve_cosines_f16",
    "clipserve_cosines_bf16",
    "clipserve_cosines_f16_single",
    "clipserve_cosines_bf16_single",
    "clipserve_softmax_topk",
)


def nvcc_command(output: Path, *, nvcc: str = "nvcc", architectures: tuple[str, ...] = ARCHITECTURES) -> list[str]:
    """The nvcc command line that builds the fatbin (used by the build CLI, the Dockerfile's stage and the tests)."""
    gencode = [f"-gencode=arch=compute_{arch[3:]},code={arch}" for arch in architectures]
    gencode.append(f"-gencode=arch={PTX_ARCHITECTURE},code={PTX_ARCHITECTURE}")
    # -Werror=all-warnings: a warning in the kernel is a build failure, in CI as in the image.
    return [nvcc, "-fatbin", "-O3", "-std=c++17", "-Werror", "all-warnings", *gencode, "-o", str(output), str(SOURCE)]
