"""PyTorch engine: the zoo's towers in fp32, fp16 or bf16; on CUDA with CUDA graphs and device-resident outputs.

This is the only service module that imports torch, and the factory imports it only for
CLIPSERVE_ENGINE=torch, so the slim install never needs torch.

On a GPU, the launch overhead of a tower's few hundred small kernels dominates at small batches, so each
batch-size bucket (1, 2, 4, ... up to the max batch size) gets its own CUDA graph: a batch is copied into the
bucket's static input buffer (rows past the batch keep whatever they held: rows never mix in a tower), the
graph is replayed, and the valid rows of its static output are cloned out before the next replay overwrites them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from models import zoo
from models.manifest import Manifest
from service.engines.base import EngineError
from service.gpu.device_array import DeviceArray, DeviceToHost
from service.settings import Settings

log = logging.getLogger("clipserve.engines")

_INPUT_DTYPES = {"image": np.float32, "text": np.int64}
# Half precision converts the tower's weights once (`.to(dtype)`) rather than running it under autocast: for a ViT
# on tensor cores the weights are then read at half the bytes, and no cast kernels run per call. Autocast keeps
# fp32 weights and re-casts every one of them on every forward (its cast cache only holds weights that require
# grad), and runs layer norms and softmax in fp32 with casts around them; a graph replay removes the launch cost
# of those casts but not their memory traffic. Accuracy does not need autocast's fp32 islands here: torch's
# half-precision layer norm and attention kernels accumulate in fp32, and the zoo towers normalise in fp32.
COMPUTE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_TOP_BUCKET = 256  # graphs' largest bucket when the caller names no max batch size
_WARMUP_ITERATIONS = 3  # eager runs on the capture stream before capturing, as torch's CUDA graph docs do
# torch allows one graph capture at a time per process; the image and text engines capture from different threads.
_CAPTURE_LOCK = threading.Lock()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes graphs are captured for: powers of two below `max_batch_size`, then `max_batch_size`.

    Ending at the max itself (100, not 128) keeps the largest bucket's buffers and padding no bigger than needed.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    buckets = []
    size = 1
    while size < max_batch_size:
        buckets.append(size)
        size *= 2
    return (*buckets, max_batch_size)


def bucket_for(rows: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket that holds `rows`; None when it exceeds the largest (that batch runs eagerly)."""
    if rows < 1:
        raise ValueError(f"a batch has at least one row, got {rows}")
    return next((bucket for bucket in buckets if bucket >= rows), None)


@dataclass(frozen=True)
class StaticForward:
    """A tower's forward on fixed buffers: write rows into `inputs`, call `replay()`, read rows of `outputs`.

    Every replay overwrites `outputs`, so rows that must outlive the next batch are cloned out.
    """

    inputs: torch.Tensor
    outputs: torch.Tensor
    replay: Callable[[], None]


# How a bucket's StaticForward is made from the tower and the bucket's (already allocated) static input buffer.
GraphCapture = Callable[[torch.nn.Module, torch.Tensor], StaticForward]


class CudaGraphCapture:
    """Captures one CUDA graph per call; all of an engine's graphs share one memory pool and one capture stream.

    Sharing the pool is safe because every static output lives as long as the engine and replays never overlap
    (the engine's lock): one pool then holds about the largest bucket's activations instead of every bucket's.
    """

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._pool = torch.cuda.graph_pool_handle()
        # One stream for warm-up and every capture: torch's docs ask pool-sharing captures to use the same stream,
        # and the warm-up then creates the per-stream library state (cuBLAS workspaces) the capture will use.
        self._stream = torch.cuda.Stream(device)

    def __call__(self, tower: torch.nn.Module, inputs: torch.Tensor) -> StaticForward:
        caller_stream = torch.cuda.current_stream(self._device)
        try:
            with torch.cuda.device(self._device), torch.inference_mode():
                self._stream.wait_stream(caller_stream)  # the static input was filled on the caller's stream
                with torch.cuda.stream(self._stream):
                    for _ in range(_WARMUP_ITERATIONS):  # lazy initialisation and autotuning stay out of the graph
                        tower(inputs)
                caller_stream.wait_stream(self._stream)
                graph = torch.cuda.CUDAGraph()
                # "thread_local": the other engine keeps running eagerly in its own thread meanwhile; "global"
                # would fail its legitimate calls (cudaMalloc, pinned allocations) while this capture is open.
                with torch.cuda.graph(graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"):
                    outputs = tower(inputs)
        finally:
            # A failed capture_end skips the context manager's stream restore; never leave the caller on our stream.
            torch.cuda.set_stream(caller_stream)
        return StaticForward(inputs, outputs, graph.replay)


class TorchEngine:
    """One zoo tower (pixels or token ids -> normalised float32 embeddings) on one device.

    The engine owns the tower from here on: it is moved and cast in place (towers from one `LoadedModel` share
    their modules, so build both engines of a model with the same device and precision).
    """

    def __init__(
        self,
        tower: torch.nn.Module,
        role: str,
        *,
        device: str,
        name: str = "",
        precision: str = "fp32",
        cuda_graphs: bool = True,
        max_batch_size: int | None = None,
        graph_capture: GraphCapture | None = None,
    ) -> None:
        if role not in _INPUT_DTYPES:
            raise EngineError(f"unknown encoder role {role!r}")
        self.role = role
        self._device = torch.device(device)
        self._dtype = _compute_dtype(precision, self._device)
        self.precision = precision
        self.max_batch_size = max_batch_size
        self._input_dtype = _INPUT_DTYPES[role]
        self._tower: torch.nn.Module | None = tower.eval().to(self._device, self._dtype)
        on_cuda = self._device.type == "cuda"
        # Embeddings stay on the GPU only where there is one; elsewhere callers use __call__.
        self.device_resident = on_cuda
        # graph_capture replaces the CUDA capture (tests on the CPU); without either, graphs are off.
        self._capture: GraphCapture | None = None
        if cuda_graphs:
            self._capture = graph_capture or (CudaGraphCapture(self._device) if on_cuda else None)
        self._buckets = batch_buckets(max_batch_size or DEFAULT_TOP_BUCKET)
        self._graphs: dict[tuple[int, tuple[int, ...]], StaticForward] = {}
        self._lock = threading.Lock()  # static buffers are shared by every call, and replay is not re-entrant
        mode = "cuda-graphs" if self._capture else "eager"
        self.description = (
            f"torch {torch.__version__} {self._device.type} {precision} {mode} {name or type(tower).__name__} {role}"
        )

    @property
    def cuda_graphs(self) -> bool:
        """Whether new buckets get graphs on first use; False after a failed capture (earlier graphs stay)."""
        return self._capture is not None

    def __call__(self, inputs: np.ndarray | torch.Tensor) -> np.ndarray:
        output = self._embed(inputs)
        return np.ascontiguousarray(output.float().cpu().numpy(), dtype=np.float32)

    def embed_on_device(self, inputs: np.ndarray | torch.Tensor) -> DeviceArray:
        """L2-normalised rows [B, D] left in device memory; the DeviceArray's owner is a tensor no later call touches.

        The stream is synchronised before returning, so a kernel on any stream (the driver API's) may read them.
        """
        if not self.device_resident:
            raise EngineError(f"{self.description} runs on the {self._device.type}: its embeddings are host arrays")
        output = self._embed(inputs)
        torch.cuda.current_stream(self._device).synchronize()
        array = DeviceArray.from_torch(output)
        return replace(array, copy_to_host=_torch_copy_to_host(output))

    def close(self) -> None:
        with self._lock:
            self._tower = None
            self._graphs.clear()
        if self._device.type == "cuda":
            with _CAPTURE_LOCK:  # empty_cache frees memory, which must not happen inside another engine's capture
                torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------------------- internals

    def _embed(self, inputs: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A contiguous [B, D] tensor on the device that no later call overwrites."""
        batch = self._to_device(inputs)
        with self._lock, torch.inference_mode():
            tower = self._tower
            if tower is None:
                raise EngineError(f"{self.description} is closed")
            rows = int(batch.shape[0])
            bucket = bucket_for(rows, self._buckets) if rows else None
            static = self._graph(tower, bucket, batch) if bucket is not None else None
            if static is None:
                return tower(batch).contiguous()
            static.inputs[:rows].copy_(batch)
            static.replay()
            return static.outputs[:rows].clone()  # the next replay reuses outputs: the clone is what callers own

    def _graph(self, tower: torch.nn.Module, bucket: int, batch: torch.Tensor) -> StaticForward | None:
        # Captured on a bucket's first use, not all at start-up: which buckets a server needs depends on its load,
        # and each capture of a large bucket reserves that bucket's activations. A first use costs a few eager
        # runs plus the capture, once per bucket (at most log2(max batch) + 1 times per engine).
        key = (bucket, tuple(batch.shape[1:]))
        static = self._graphs.get(key)
        if static is not None or self._capture is None:
            return static
        inputs = torch.zeros((bucket, *key[1]), dtype=batch.dtype, device=self._device)
        try:
            with _CAPTURE_LOCK:
                static = self._capture(tower, inputs)
        except Exception as error:  # any capture failure (a host sync in the tower, an op graphs cannot hold)
            # Logged once: no further capture is tried. Buckets captured before keep replaying their graphs.
            log.warning(
                "%s: CUDA graph capture failed; batch sizes without a graph run eagerly from now on: %s",
                self.description,
                error,
            )
            self._capture = None
            return None
        log.info("%s: captured a CUDA graph for batch size %d", self.description, bucket)
        self._graphs[key] = static
        return static

    def _to_device(self, inputs: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(inputs, torch.Tensor):
            # Already a tensor (GPU preprocessing keeps pixels on the device): no host round trip.
            wanted_float = self.role == "image"
            if inputs.is_floating_point() != wanted_float or inputs.is_complex():
                kind = "floating-point pixels" if wanted_float else "integer token ids"
                raise EngineError(f"{self.description} takes {kind}, got a {inputs.dtype} tensor")
            tensor = inputs
        else:
            tensor = torch.from_numpy(np.ascontiguousarray(inputs, dtype=self._input_dtype))
        # Upload first, then cast: a dtype change during a blocking host-to-device copy would run on the CPU.
        tensor = tensor.to(self._device)
        return tensor.to(self._dtype if self.role == "image" else torch.long)


def _compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    dtype = COMPUTE_DTYPES.get(precision)
    if dtype is None:
        raise EngineError(f"the torch engine computes in {', '.join(COMPUTE_DTYPES)}, not {precision!r}")
    if device.type == "cpu" and precision == "fp16":
        raise EngineError(
            "fp16 on the CPU: torch's CPU float16 kernels are slow or missing; use CLIPSERVE_PRECISION=fp32 or "
            "bf16 on the CPU, or fp16 on a CUDA GPU"
        )
    if device.type == "cpu" and precision == "bf16":
        try:  # the ops every tower needs, on a tiny input: cheaper than failing the first request
            probe = torch.ones((1, 2, 4, 4), dtype=dtype)
            torch.nn.functional.conv2d(probe, torch.ones((2, 2, 1, 1), dtype=dtype))
            torch.nn.functional.layer_norm(probe, (4,))
            torch.nn.functional.linear(probe, torch.ones((3, 4), dtype=dtype)).softmax(-1)
        except RuntimeError as error:
            raise EngineError(f"bf16 does not run on the CPU in torch {torch.__version__}: {error}") from error
    if device.type == "cuda" and precision == "bf16":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            raise EngineError(
                f"bf16 needs a GPU of compute capability 8.0 or newer; this one is {major}.{minor} (use fp16)"
            )
    return dtype


def _torch_copy_to_host(owner: torch.Tensor) -> DeviceToHost:
    """DeviceArray.to_host through torch, on the owner's own memory (and rows views of it): no driver API needed."""
    # DeviceArray moves 2-byte floats as their bits (uint16); reinterpreting as int16 keeps the bits.
    flat = (owner if owner.dtype == torch.float32 else owner.view(torch.int16)).reshape(-1)
    base, itemsize = owner.data_ptr(), owner.element_size()

    def copy(pointer: int, out: np.ndarray) -> None:
        start = (pointer - base) // itemsize
        if pointer < base or start + out.size > flat.numel():
            raise ValueError("the address is outside the engine output this copy belongs to")
        host = flat[start : start + out.size].cpu().numpy()
        out.reshape(-1)[:] = host.view(out.dtype)

    return copy


def _load(manifest: Manifest, settings: Settings) -> zoo.LoadedModel:
    if settings.torch_model:
        log.info("torch engine: loading %s (CLIPSERVE_TORCH_MODEL)", settings.torch_model)
        return zoo.load_model(settings.torch_model)
    source = manifest.source
    match source.kind:
        case "demo":
            return zoo.load_demo()
        case "open_clip" if isinstance(source.architecture, str) and source.pretrained:
            # Downloads on first use (or reads open_clip's cache): the user chose a pretrained tag.
            log.info("torch engine: loading open_clip %s@%s", source.architecture, source.pretrained)
            return zoo.load_open_clip(source.architecture, source.pretrained)
    raise EngineError(
        f"the manifest of {manifest.name} does not say where to get its torch weights (source kind "
        f"{source.kind!r}); set CLIPSERVE_TORCH_MODEL to a models.zoo reference (e.g. open_clip:ARCH@FILE or hf:DIR)"
    )


def load_torch_engines(manifest: Manifest, settings: Settings) -> tuple[TorchEngine, TorchEngine]:
    """(image, text) engines from the weights the manifest's graphs were exported from."""
    try:
        loaded = _load(manifest, settings)
    except (OSError, ValueError, NotImplementedError) as error:  # missing files, bad reference, unsupported model
        raise EngineError(f"cannot load the torch weights for {manifest.name}: {error}") from error
    expected, actual = manifest.source.sha256, loaded.source.get("sha256")
    if expected and actual and expected != actual:
        raise EngineError(
            f"the weights differ from the ones the graphs were exported from: {loaded.name} has sha256 "
            f"{actual[:16]}…, the manifest of {manifest.name} records {expected[:16]}…"
        )
    if loaded.embed_dim != manifest.embed_dim:
        raise EngineError(
            f"{loaded.name} embeds into {loaded.embed_dim} dimensions, the manifest of {manifest.name} into "
            f"{manifest.embed_dim}: not the same model"
        )
    precision: str = settings.precision
    if precision not in COMPUTE_DTYPES:
        log.warning("CLIPSERVE_PRECISION=%s selects exported graphs; the torch engine runs fp32", precision)
        precision = "fp32"
    cuda_graphs = settings.torch_cuda_graphs
    device = default_device()
    # Text gets graphs too (the same code, no extra cost): filling the label cache for a large label set runs
    # hundreds of small text batches, which are launch-bound on a GPU just like small image batches.
    options: dict[str, Any] = dict(device=device, name=loaded.name, precision=precision, cuda_graphs=cuda_graphs)
    return (
        TorchEngine(loaded.image_tower, "image", max_batch_size=settings.max_batch_size, **options),
        TorchEngine(loaded.text_tower, "text", max_batch_size=settings.text_max_batch_size, **options),
    )
