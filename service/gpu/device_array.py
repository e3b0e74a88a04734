"""A matrix in CUDA device memory, named by its raw address: what engines hand the similarity kernel.

Engines own their output memory in different ways (a torch tensor, an ONNX Runtime OrtValue, a CUDA
allocation, a CuPy array); `DeviceArray` keeps a reference to that owner, so the memory lives as long as any
view of it, and exposes only the address, shape and dtype the kernel needs. No torch import: `from_torch`
reads the tensor's attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

# Element sizes of the dtypes the similarity kernel takes; bfloat16 has no numpy dtype, so it is moved as uint16.
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_TORCH_DTYPES = {"torch.float32": "float32", "torch.float16": "float16", "torch.bfloat16": "bfloat16"}


class DeviceToHost(Protocol):
    """Copies `nbytes` from device address `pointer` into the host array `out` and waits for the copy."""

    def __call__(self, pointer: int, out: np.ndarray) -> None: ...


@dataclass(frozen=True)
class DeviceArray:
    """A row-major, contiguous [rows, cols] matrix on CUDA device `device`."""

    pointer: int
    shape: tuple[int, int]
    dtype: str  # "float32" | "float16" | "bfloat16"
    owner: Any = field(repr=False, compare=False)  # keeps the memory alive while any view exists
    device: int = 0
    # How to_host copies; engines that know their runtime pass its copy, else the CUDA driver's is used.
    copy_to_host: DeviceToHost | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.dtype not in ITEMSIZE:
            raise ValueError(f"unsupported device dtype {self.dtype!r}; expected one of {sorted(ITEMSIZE)}")
        if len(self.shape) != 2 or min(self.shape) < 0:
            raise ValueError(f"a DeviceArray is a [rows, cols] matrix; got shape {self.shape}")

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def row_bytes(self) -> int:
        return self.shape[1] * self.itemsize

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def rows(self, start: int, stop: int) -> DeviceArray:
        """Rows [start, stop) as a view on the same memory (and the same owner)."""
        if not 0 <= start <= stop <= self.shape[0]:
            raise IndexError(f"rows [{start}, {stop}) out of range for {self.shape[0]} rows")
        return DeviceArray(
            self.pointer + start * self.row_bytes,
            (stop - start, self.shape[1]),
            self.dtype,
            self.owner,
            self.device,
            self.copy_to_host,
        )

    def __getitem__(self, index: slice) -> DeviceArray:
        if not isinstance(index, slice):
            raise TypeError("a DeviceArray is indexed by row slices only")
        start, stop, step = index.indices(self.shape[0])
        if step != 1:
            raise ValueError("a DeviceArray row slice must be contiguous (step 1)")
        return self.rows(start, max(start, stop))

    def to_host(self) -> np.ndarray:
        """The matrix as float32 on the host (a blocking copy)."""
        raw = np.empty(self.shape, dtype=np.float32 if self.dtype == "float32" else np.uint16)
        if raw.size:
            copy = self.copy_to_host
            if copy is None:
                from service.gpu.driver import copy_to_host as driver_copy  # the CUDA driver, loaded on first use

                copy = driver_copy
            copy(self.pointer, raw)
        return widen_to_float32(raw, self.dtype)

    @classmethod
    def from_torch(cls, tensor: Any) -> DeviceArray:
        """A view of a contiguous 2-D CUDA torch tensor (the tensor is the owner)."""
        dtype = _TORCH_DTYPES.get(str(tensor.dtype))
        if dtype is None or tensor.dim() != 2 or not tensor.is_cuda or not tensor.is_contiguous():
            raise ValueError(
                f"need a contiguous 2-D CUDA tensor of float32, float16 or bfloat16; got {tensor.dtype} "
                f"{tuple(tensor.shape)} on {tensor.device}"
            )
        return cls(
            int(tensor.data_ptr()),
            (int(tensor.shape[0]), int(tensor.shape[1])),
            dtype,
            tensor,
            int(tensor.device.index or 0),
        )


def widen_to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Host bits of a float32/float16/bfloat16 matrix as float32 (bfloat16 is the top half of a float32)."""
    if dtype == "float32":
        return np.ascontiguousarray(raw, dtype=np.float32)
    if dtype == "float16":
        return raw.view(np.float16).astype(np.float32)
    return (raw.astype(np.uint32) << 16).view(np.float32)


def bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even, as the GPU converts them."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + rounding) >> 16).astype(np.uint16)
