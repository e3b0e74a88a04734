"""Scores on the GPU: device-resident image embeddings against a label matrix, with the CUDA similarity kernel.

`CudaSimilarity` keeps label matrices on the device in an LRU bounded in bytes (keyed by the label set and the
image dtype, since fp16 embeddings are scored against an fp16 copy), launches the cosine GEMM and the fused
softmax + top-k pass (service/kernels/similarity.cu), and copies back only the top k per image, or, when every
label is wanted ranked, the cosines and probabilities of the whole row. The numpy path (models/scoring.py)
stays the CPU path and the reference these results are tested against.

Rows are scored in groups so the fp32 cosine workspace [group, C] stays within `workspace_bytes`. One launch
sequence at a time (a lock): the workspace and the stream are shared, and each call is tens of microseconds.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from models.scoring import Scoring
from service.gpu.cublas import CublasGemm
from service.gpu.device_array import DeviceArray, bfloat16_bits, widen_to_float32
from service.gpu.driver import CudaError, DeviceAllocation, Float32, Int32, KernelArgument, Pointer
from service.kernels import DEFAULT_FATBIN, ENTRY_POINTS

log = logging.getLogger("clipserve.gpu")

MAX_TOP_K = 128  # similarity.cuh's kMaxTopK: beyond it (or for every label) the whole row comes back
ROW_THREADS = 512  # kRowThreads
# similarity.cu's GEMM tiles: 64 labels per block; 64 images per fp32 block, 128 per fp16/bf16 block.
LABEL_TILE = 64
IMAGE_TILE = {"float32": 64, "float16": 128, "bfloat16": 128}
WORKSPACE_ROWS = 128  # the workspace holds whole image tiles of either size
MAX_GRID_Y = 65_535  # CUDA's limit on a grid's y dimension, where the label tiles go
_GEMM_THREADS = 256
_COSINE_KERNELS = {
    ("float32", True): "clipserve_cosines_f32",
    ("float32", False): "clipserve_cosines_f32",
    ("float16", True): "clipserve_cosines_f16",
    ("float16", False): "clipserve_cosines_f16_single",
    ("bfloat16", True): "clipserve_cosines_bf16",
    ("bfloat16", False): "clipserve_cosines_bf16_single",
}
_ACTIVATIONS = {"softmax": 0, "sigmoid": 1}


class Driver(Protocol):
    """What this module needs of service.gpu.driver.CudaDriver (a host-memory fake in the tests)."""

    device: int

    @property
    def stream_handle(self) -> int: ...

    def make_current(self) -> None: ...

    def l2_cache_bytes(self) -> int: ...

    def load_kernels(self, image: bytes, names: tuple[str, ...]) -> None: ...

    def launch(self, name: str, grid: tuple[int, int], block: int, arguments: list[KernelArgument]) -> None: ...

    def allocate(self, nbytes: int) -> DeviceAllocation: ...

    def upload(self, pointer: int, array: np.ndarray) -> None: ...

    def download(self, pointer: int, out: np.ndarray) -> None: ...


@dataclass(frozen=True)
class LabelSet:
    """A label matrix [C, D] (float32, L2-normalised rows) and a key that names its contents."""

    key: str
    matrix: np.ndarray


@dataclass(frozen=True)
class RankedScores:
    """Per image, labels by descending probability (ties by label order): indices, probabilities, cosines."""

    indices: np.ndarray  # [B, K] int64
    probabilities: np.ndarray  # [B, K] float64
    cosines: np.ndarray  # [B, K] float32


def row_stride(count: int) -> int:
    """Floats between rows of the cosine workspace: `count` rounded up to whole label tiles, so a GEMM block
    stores full tiles and every row is aligned for 16-byte loads."""
    return -(-count // LABEL_TILE) * LABEL_TILE


def workspace_rows(rows: int) -> int:
    return -(-rows // WORKSPACE_ROWS) * WORKSPACE_ROWS


def _device_bits(matrix: np.ndarray, dtype: str, residuals: bool) -> np.ndarray:
    """Host bytes of the label matrix as the kernel reads it: fp32 as is; fp16/bf16 rounded, followed (with
    `residuals`) by what the rounding lost, [2C, D], so the labels keep about fp32 accuracy (similarity.cu)."""
    labels = np.ascontiguousarray(matrix, dtype=np.float32)
    if dtype == "float32":
        return labels
    if dtype == "float16":
        high = labels.astype(np.float16)
        if not residuals:
            return high
        return np.concatenate([high, (labels - high.astype(np.float32)).astype(np.float16)])
    high_bits = bfloat16_bits(labels)
    if not residuals:
        return high_bits
    return np.concatenate([high_bits, bfloat16_bits(labels - widen_to_float32(high_bits, "bfloat16"))])


class DeviceLabelCache:
    """Label matrices on the device, least recently used first out, bounded in bytes."""

    def __init__(self, driver: Driver, capacity_bytes: int, *, residuals: bool = True) -> None:
        self._driver, self.capacity_bytes, self._residuals = driver, capacity_bytes, residuals
        self._entries: OrderedDict[tuple[str, str], DeviceAllocation] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def residuals(self) -> bool:
        """Whether fp16/bf16 entries hold residual halves ([2C, D]); fixed, since the GEMMs read the layout."""
        return self._residuals

    def get(self, labels: LabelSet, dtype: str) -> DeviceAllocation:
        key = (labels.key, dtype)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry
        self.misses += 1
        bits = _device_bits(labels.matrix, dtype, self._residuals)
        entry = self._driver.allocate(bits.nbytes)
        self._driver.upload(entry.pointer, bits)
        self._entries[key] = entry
        self.bytes += entry.nbytes
        # Evict down to the bound, but never the entry just added: a set larger than the bound is still scored.
        while self.bytes > self.capacity_bytes and len(self._entries) > 1:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.nbytes
            evicted.free()
        return entry

    def forget(self, key: str) -> None:
        for cached in [cached for cached in self._entries if cached[0] == key]:
            entry = self._entries.pop(cached)
            self.bytes -= entry.nbytes
            entry.free()

    def clear(self) -> None:
        for entry in self._entries.values():
            entry.free()
        self._entries.clear()
        self.bytes = 0


class _Buffers:
    """Device scratch that only grows, one allocation per slot."""

    def __init__(self, driver: Driver) -> None:
        self._driver = driver
        self._slots: dict[str, DeviceAllocation] = {}

    def get(self, slot: str, nbytes: int) -> int:
        current = self._slots.get(slot)
        if current is None or current.nbytes < nbytes:
            if current is not None:
                current.free()
            current = self._slots[slot] = self._driver.allocate(nbytes)
        return current.pointer

    def clear(self) -> None:
        for allocation in self._slots.values():
            allocation.free()
        self._slots.clear()


class CudaSimilarity:
    """The GPU similarity step: device embeddings + a label set -> ranked labels on the host."""

    def __init__(
        self,
        driver: Driver | None = None,
        *,
        fatbin: Path = DEFAULT_FATBIN,
        label_cache_bytes: int = 512 * 1024 * 1024,
        workspace_bytes: int = 64 * 1024 * 1024,
        label_residuals: bool = True,
        gemm: str = "auto",
        cublas_library: object = None,
    ) -> None:
        """`label_residuals` (fp16/bf16 embeddings only): score against the labels' rounded values plus what the
        rounding lost (CPU-path parity, twice the GEMM work) rather than the rounded values alone.
        `gemm`: "cublas" (cublasGemmEx), "kernel" (similarity.cu's WMMA/FMA GEMM), or "auto": cuBLAS when libcublas
        loads. `cublas_library` replaces libcublas (tests)."""
        if driver is None:
            from service.gpu.driver import default_driver

            driver = default_driver()
        self._driver = driver
        fatbin = Path(fatbin)
        if not fatbin.is_file():
            raise FileNotFoundError(
                f"the CUDA similarity kernel {fatbin} has not been built: run `make kernels` "
                "(python -m service.kernels.build), which needs the CUDA toolkit's nvcc"
            )
        driver.make_current()
        driver.load_kernels(fatbin.read_bytes(), ENTRY_POINTS)
        self.device = driver.device
        self._l2_bytes = driver.l2_cache_bytes()
        self.labels = DeviceLabelCache(driver, label_cache_bytes, residuals=label_residuals)
        self.workspace_bytes = workspace_bytes
        self._buffers = _Buffers(driver)
        self._lock = threading.Lock()
        self._cublas = self._load_cublas(gemm, cublas_library)
        self.gemm = "cublas" if self._cublas is not None else "kernel"

    def _load_cublas(self, gemm: str, library: object) -> CublasGemm | None:
        if gemm not in ("auto", "cublas", "kernel"):
            raise ValueError(f"gemm must be auto, cublas or kernel, not {gemm!r}")
        if gemm == "kernel":
            return None
        try:
            return CublasGemm(self._driver.stream_handle, library)
        except CudaError as error:  # GpuUnavailable included: no libcublas here
            if gemm == "cublas":
                raise
            log.info("similarity GEMM: the kernel's own (cuBLAS unavailable: %s)", error)
            return None

    def rank(self, images: DeviceArray, labels: LabelSet, scoring: Scoring, top_k: int | None) -> RankedScores:
        """Labels ranked per image; top_k None (or above MAX_TOP_K) ranks every label on the host."""
        count, dim = labels.matrix.shape
        if images.shape[1] != dim:
            raise ValueError(f"image embeddings have {images.shape[1]} dimensions, the labels {dim}")
        if images.device != self.device:
            raise ValueError(f"image embeddings are on GPU {images.device}, the similarity kernel on GPU {self.device}")
        k = count if top_k is None else min(top_k, count)
        rows = len(images)
        if rows == 0:
            empty = np.empty((0, k))
            return RankedScores(empty.astype(np.int64), empty, empty.astype(np.float32))
        with self._lock:
            self._driver.make_current()
            label_matrix = self.labels.get(labels, images.dtype).pointer
            group = self._group_rows(rows, count)
            spans = [(start, min(start + group, rows)) for start in range(0, rows, group)]
            if k > MAX_TOP_K:
                parts = [
                    self._rank_on_host(
                        self._cosines(images.rows(*span), label_matrix, count), span[1] - span[0], count, k, scoring
                    )
                    for span in spans
                ]
                return RankedScores(*(np.concatenate(column) for column in zip(*parts, strict=True)))
            # One [3, rows, k] output block for every group: one copy (and one wait) brings all of it back.
            # Groups reuse the cosine workspace safely: everything runs in order on one stream.
            top = self._buffers.get("top", 3 * rows * k * 4)
            for start, stop in spans:
                cosines = self._cosines(images.rows(start, stop), label_matrix, count)
                outputs = tuple(top + (part * rows + start) * k * 4 for part in range(3))
                self._softmax_topk(cosines, stop - start, count, k, scoring, outputs, probabilities=0)
            out = np.empty((3, rows, k), np.float32)
            self._driver.download(top, out)
        return RankedScores(out[2].view(np.int32).astype(np.int64), out[1].astype(np.float64), out[0].copy())

    def _group_rows(self, rows: int, count: int) -> int:
        """Rows scored per launch pair, in whole tiles of 128: their cosines fit the workspace and, on a GPU, about
        half of L2, where the row kernel's passes then find them."""
        row_bytes = row_stride(count) * 4
        budget = self.workspace_bytes
        if self._l2_bytes:
            budget = min(budget, max(self._l2_bytes // 2, WORKSPACE_ROWS * row_bytes))
        # At least one whole tile of rows: the GEMM computes (and the workspace holds) 128 rows anyway, and every
        # further group reads all the labels again.
        group = max(WORKSPACE_ROWS, budget // row_bytes)
        return min(rows, group - group % WORKSPACE_ROWS)

    def _cosines(self, images: DeviceArray, labels: int, count: int) -> int:
        """Launch the cosine GEMM for these rows into the workspace ([workspace_rows(rows), row_stride(count)]);
        returns its address."""
        rows, dim, stride = len(images), images.shape[1], row_stride(count)
        cosines = self._buffers.get("cosines", workspace_rows(rows) * stride * 4)
        if self._cublas is None and -(-count // LABEL_TILE) > MAX_GRID_Y:
            raise ValueError(
                f"{count:,} labels: the kernel's own GEMM takes at most {MAX_GRID_Y * LABEL_TILE:,} (use cuBLAS)"
            )
        if self._cublas is not None:
            with_residuals = self.labels.residuals and images.dtype != "float32"
            residuals = labels + count * dim * images.itemsize if with_residuals else 0
            self._cublas.cosines(
                images.pointer, labels, images.dtype, rows, count, dim, cosines, stride, residuals=residuals
            )
            return cosines
        self._driver.launch(
            _COSINE_KERNELS[images.dtype, self.labels.residuals],
            (-(-rows // IMAGE_TILE[images.dtype]), -(-count // LABEL_TILE)),  # image tiles on x (similarity.cu)
            _GEMM_THREADS,
            [
                Pointer(images.pointer),
                Pointer(labels),
                Int32(rows),
                Int32(count),
                Int32(dim),
                Pointer(cosines),
                Int32(stride),
            ],
        )
        return cosines

    def _softmax_topk(
        self,
        cosines: int,
        rows: int,
        count: int,
        k: int,
        scoring: Scoring,
        outputs: tuple[int, ...],
        probabilities: int,
    ) -> None:
        """Launch the row kernel: top-k cosines, probabilities and label indices into `outputs` (three [rows, k]
        arrays of 4-byte values), and every probability into `probabilities` unless that is 0."""
        self._driver.launch(
            "clipserve_softmax_topk",
            (rows, 1),
            ROW_THREADS,
            [
                Pointer(cosines),
                Int32(row_stride(count)),
                Int32(rows),
                Int32(count),
                Int32(k),
                Float32(scoring.logit_scale),
                Float32(scoring.logit_bias or 0.0),
                Int32(_ACTIVATIONS[scoring.activation]),
                *map(Pointer, outputs),
                Pointer(probabilities),
            ],
        )

    def _rank_on_host(
        self, cosines: int, rows: int, count: int, k: int, scoring: Scoring
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """More labels than the kernel's top-k holds: the kernel writes every probability (k = 1 is its cheapest
        top-k), the whole rows come back and numpy sorts them, the same stable order as the CPU path."""
        driver = self._driver
        probabilities = self._buffers.get("probabilities", rows * count * 4)
        top = self._buffers.get("top", 3 * rows * 4)
        self._softmax_topk(cosines, rows, count, 1, scoring, (top, top + rows * 4, top + 2 * rows * 4), probabilities)
        padded = np.empty((rows, row_stride(count)), np.float32)
        host_probabilities = np.empty((rows, count), np.float32)
        driver.download(cosines, padded)
        host_cosines = padded[:, :count]
        driver.download(probabilities, host_probabilities)
        # By cosine, as the kernel ranks: fp32 probabilities of far-off labels underflow to equal zeros, cosines
        # keep their order (the CPU path's float64 probabilities do too).
        order = np.argsort(-host_cosines, axis=1, kind="stable")[:, :k]
        return (
            order.astype(np.int64),
            np.take_along_axis(host_probabilities, order, axis=1).astype(np.float64),
            np.take_along_axis(host_cosines, order, axis=1),
        )

    def self_test(self, dim: int) -> None:
        """Score a known embedding against two labels in each input dtype (fp32 FMA and both tensor-core GEMMs);
        ValueError unless the kernel ranks them correctly."""
        image = np.zeros((1, dim), np.float32)
        image[0, 0] = 1.0
        labels = np.zeros((2, dim), np.float32)
        labels[0, 1] = labels[1, 0] = 1.0  # label 1 is the image itself
        bits: dict[str, np.ndarray] = {
            "float32": image,
            "float16": image.astype(np.float16),
            "bfloat16": bfloat16_bits(image),
        }
        try:
            for dtype, host in bits.items():
                memory = self._driver.allocate(host.nbytes)
                self._driver.upload(memory.pointer, host)
                result = self.rank(
                    DeviceArray(memory.pointer, (1, dim), dtype, memory, self.device),
                    LabelSet("self-test", labels),
                    Scoring(100.0, None, "softmax"),
                    2,
                )
                if result.indices.tolist() != [[1, 0]] or not 0.999 < result.probabilities[0, 0] <= 1.0:
                    raise ValueError(f"the CUDA similarity kernel failed its {dtype} self-test: {result}")
        finally:
            self.labels.forget("self-test")

    def close(self) -> None:
        with self._lock:
            self.labels.clear()
            self._buffers.clear()
            if self._cublas is not None:
                self._cublas.close()


def load_cuda_similarity(
    mode: str,
    image_engine: object,
    *,
    fatbin: Path | None,
    label_cache_bytes: int,
    dim: int,
    label_residuals: bool = True,
    gemm: str = "auto",
) -> CudaSimilarity | None:
    """The CUDA similarity step for CLIPSERVE_SIMILARITY=`mode`, or None for the numpy path.

    auto picks the kernel only when the image engine leaves its embeddings on a GPU and the kernel loads and
    passes a self-test; cuda insists (a clear EngineError otherwise); numpy never loads it.
    """
    from service.engines.base import EngineError

    if mode == "numpy":
        return None
    description = getattr(image_engine, "description", type(image_engine).__name__)
    if not getattr(image_engine, "device_resident", False):
        if mode == "cuda":
            raise EngineError(
                f"CLIPSERVE_SIMILARITY=cuda needs an image engine that keeps embeddings on the GPU (torch on CUDA, "
                f"onnxruntime with the CUDA or TensorRT provider, tensorrt); {description} does not"
            )
        log.info("similarity: numpy (%s returns host embeddings)", description)
        return None
    try:
        similarity = CudaSimilarity(
            fatbin=fatbin or DEFAULT_FATBIN,
            label_cache_bytes=label_cache_bytes,
            label_residuals=label_residuals,
            gemm=gemm,
        )
        similarity.self_test(dim)
    except (CudaError, OSError, ValueError) as error:
        if mode == "cuda":
            raise EngineError(
                f"CLIPSERVE_SIMILARITY=cuda, but the CUDA similarity kernel is unusable: {error}"
            ) from error
        log.warning("similarity: numpy, because the CUDA kernel is unusable: %s", error)
        return None
    log.info("similarity: CUDA kernel (GEMM: %s) on %s embeddings", similarity.gemm, description)
    return similarity
