"""A Triton Inference Server model repository for a CLIP model's two encoders.

`write_triton_repository(root, "clip", graphs, policy)` writes one Triton model per encoder:

    root/
      clip-image/
        config.pbtxt          # platform, max_batch_size, input/output, dynamic_batching, instance_group
        1/
          model.onnx
          model.onnx.data     # only if the graph keeps its weights in external data (same file name as exported)
      clip-text/
        config.pbtxt
        1/
          model.onnx

Each model takes a batch of one tensor and returns a batch of L2-normalised float32 embeddings:
image `pixels [B, 3, H, W]` -> `embeddings [B, D]`, text `token_ids [B, L]` -> `embeddings [B, D]`. The
batch axis is Triton's (max_batch_size > 0), so `dims` in the configs leave it out. Triton's dynamic
batcher then merges concurrent requests into one encoder call, the job the service's own batcher does
when the encoders run in-process. The repository can be served by `tritonserver --model-repository=root`
or by KServe's Triton runtime.

Why the service still owns prompts, the label cache and similarity when the encoders live on Triton:
Triton only runs tensors in, tensors out. Turning a label into token ids (the BPE tokenizer and the prompt
templates), averaging the template embeddings into one class embedding, caching those class embeddings in
Redis so a label set is encoded once rather than on every request, decoding and preprocessing the image,
and scoring (cosine similarity times the model's logit scale, plus bias, then softmax or sigmoid) all
depend on the model manifest and on per-request label sets. Keeping them in the service means a Triton
deployment changes where the two matrix-heavy encoder calls run and nothing about what a request
returns; moving them into Triton would need a Python-backend ensemble that duplicates the service.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import onnx

from export.files import replace_directory
from export.graphs import external_data_locations
from models.manifest import Manifest, TensorSpec

VERSION = "1"  # one version per export; a re-export replaces it rather than adding version 2
CONFIG_FILENAME = "config.pbtxt"
ROLES = ("image", "text")
INSTANCE_KINDS = ("KIND_GPU", "KIND_CPU")
# The exported fp32 ONNX graphs run on Triton's onnxruntime backend, which loads this file name by default.
PLATFORM = "onnxruntime_onnx"
MODEL_FILENAME = "model.onnx"
_TRITON_TYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
}
_ONNX_TYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
}
# Triton's model names become directory names and URL path segments (v2/models/<name>/infer). A leading
# dot is refused too: the directory would be hidden and "." / ".." are path components, not names.
_MODEL_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class TritonTensor:
    name: str  # "pixels" | "token_ids" | "embeddings"
    dtype: str  # numpy-style: "float32" | "int64" | "float16" | "int32"
    dims: tuple[int, ...]  # without the batch axis, e.g. (3, 224, 224), (77,), (512,); -1 marks a dynamic axis


@dataclass(frozen=True)
class TritonGraph:
    role: str  # "image" | "text"
    path: Path  # an ONNX file, possibly with external-data files beside it
    inputs: tuple[TritonTensor, ...]
    outputs: tuple[TritonTensor, ...]


@dataclass(frozen=True)
class BatchingPolicy:
    """Triton's dynamic batcher and instance settings, shared by both encoders.

    `preferred_batch_sizes` left empty means `(max_batch_size,)`: Triton's batcher guide advises against
    listing several preferred sizes unless some sizes run markedly faster (e.g. TensorRT profiles tuned at
    those sizes), because the batcher then cuts batches at a listed size instead of taking every request
    that is waiting. Naming only the maximum keeps that default behaviour (a full batch runs at once; a
    partial one runs when `max_queue_delay_microseconds` expires) while keeping the field explicit.
    """

    max_batch_size: int = 64
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_microseconds: int = 2000
    instance_count: int = 1
    instance_kind: str = "KIND_GPU"

    def __post_init__(self) -> None:
        # max_batch_size 0 would mean "no batch axis", which contradicts dims given without one.
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        for size in self.preferred_batch_sizes:
            if not 1 <= size <= self.max_batch_size:
                raise ValueError(f"preferred batch size {size} is outside 1..max_batch_size={self.max_batch_size}")
        if self.max_queue_delay_microseconds < 0:
            raise ValueError(f"max_queue_delay_microseconds must be >= 0, got {self.max_queue_delay_microseconds}")
        if self.instance_count < 1:
            raise ValueError(f"instance_count must be at least 1, got {self.instance_count}")
        if self.instance_kind not in INSTANCE_KINDS:
            raise ValueError(f"instance_kind must be one of {INSTANCE_KINDS}, got {self.instance_kind!r}")

    def resolved_preferred_batch_sizes(self) -> tuple[int, ...]:
        """The preferred sizes written to config.pbtxt: the given ones sorted and deduplicated, or the max."""
        if not self.preferred_batch_sizes:
            return (self.max_batch_size,)
        return tuple(sorted(set(self.preferred_batch_sizes)))


def triton_data_type(dtype: str) -> str:
    """Numpy-style dtype name -> Triton's `data_type` enum, for the dtypes the encoders use."""
    try:
        return _TRITON_TYPES[dtype]
    except (KeyError, TypeError):
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(_TRITON_TYPES)}") from None


def render_config(model_name: str, graph: TritonGraph, policy: BatchingPolicy) -> str:
    """The config.pbtxt text for one encoder; `model_name` is the full Triton name (its directory name)."""
    _check_model_name(model_name)
    if graph.role not in ROLES:
        raise ValueError(f"unknown role {graph.role!r}; expected one of {ROLES}")
    if not graph.inputs or not graph.outputs:
        raise ValueError(f"the {graph.role} graph needs at least one input and one output")
    lines = [
        "# Generated by `clipserve export`; re-export rather than editing, or the next export overwrites it.",
        f"name: {_quote(model_name)}",
        f"platform: {_quote(PLATFORM)}",
        f"default_model_filename: {_quote(MODEL_FILENAME)}",
        f"max_batch_size: {policy.max_batch_size}",
        *_tensor_block("input", graph.inputs),
        *_tensor_block("output", graph.outputs),
        "dynamic_batching {",
        f"  preferred_batch_size: {_int_list(policy.resolved_preferred_batch_sizes())}",
        f"  max_queue_delay_microseconds: {policy.max_queue_delay_microseconds}",
        "}",
        "instance_group [",
        "  {",
        f"    count: {policy.instance_count}",
        f"    kind: {policy.instance_kind}",
        "  }",
        "]",
        # Left commented because both change numerics or resource use and need measuring on the target
        # hardware; they are the onnxruntime backend's documented knobs.
        "# ONNX Runtime options (Triton onnxruntime backend), off by default:",
        "# run supported subgraphs through ONNX Runtime's TensorRT execution provider in FP16",
        '#   optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt"',
        '#     parameters { key: "precision_mode" value: "FP16" } } ] } }',
        "# bound each CPU instance's threads when several KIND_CPU instances share the cores",
        '#   parameters { key: "intra_op_thread_count" value: { string_value: "4" } }',
    ]
    return "\n".join(lines) + "\n"


def write_triton_repository(
    root: Path, model_name: str, graphs: Sequence[TritonGraph], policy: BatchingPolicy
) -> list[Path]:
    """Write `root/<model_name>-<role>/{config.pbtxt, 1/model.onnx}` for each graph; return the config paths.

    Every model directory is built in a temporary directory inside `root` and swapped in only once all of
    them are complete, so a failed export (missing file, bad graph) leaves the previous repository as it
    was, and a successful one leaves no file of the previous export behind. Other models in `root` are
    left alone.
    """
    _check_model_name(model_name)
    graphs = tuple(graphs)
    if not graphs:
        raise ValueError("no graphs to write")
    roles = [graph.role for graph in graphs]
    if len(set(roles)) != len(roles):
        raise ValueError(f"each role may appear once, got {roles}")
    # Render and inspect everything before touching the disk so that bad input fails without side effects.
    rendered = []
    for graph in graphs:
        name = f"{model_name}-{graph.role}"
        config = render_config(name, graph, policy)
        external = _inspect_onnx(graph)
        rendered.append((graph, name, config, external))

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []
    try:
        for graph, name, config, external in rendered:
            # Staging inside root keeps the final rename on one filesystem, where it is atomic.
            stage = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".staging", dir=root))
            staged.append((stage, root / name))
            _populate(stage, graph, config, external)
        for stage, final in staged:
            replace_directory(stage, final)
    finally:
        for stage, _ in staged:
            shutil.rmtree(stage, ignore_errors=True)
    return [final / CONFIG_FILENAME for _, final in staged]


def _check_model_name(model_name: str) -> None:
    if not isinstance(model_name, str) or not _MODEL_NAME.fullmatch(model_name):
        raise ValueError(
            f"invalid Triton model name {model_name!r}: use ASCII letters, digits, '-', '_' and '.', "
            "not starting with '.'"
        )


def _quote(text: str) -> str:
    # Protobuf text format strings use C-style escapes.
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _int_list(values: Sequence[int]) -> str:
    return "[ " + ", ".join(str(value) for value in values) + " ]"


def _tensor_block(kind: str, tensors: Sequence[TritonTensor]) -> list[str]:
    names = [tensor.name for tensor in tensors]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate {kind} names: {names}")
    lines = [f"{kind} ["]
    for index, tensor in enumerate(tensors):
        if not tensor.name:
            raise ValueError(f"an {kind} tensor has an empty name")
        # Triton rejects empty dims for a batched model (the per-item shape must have a rank), and only -1
        # stands for a variable-size axis.
        if not tensor.dims or any(dim < 1 and dim != -1 for dim in tensor.dims):
            raise ValueError(f"{kind} {tensor.name!r}: dims must be positive or -1 and non-empty, got {tensor.dims}")
        lines += [
            "  {",
            f"    name: {_quote(tensor.name)}",
            f"    data_type: {triton_data_type(tensor.dtype)}",
            f"    dims: {_int_list(tensor.dims)}",
            "  }" + ("," if index < len(tensors) - 1 else ""),
        ]
    lines.append("]")
    return lines


def _inspect_onnx(graph: TritonGraph) -> list[PurePosixPath]:
    """Check the ONNX graph against the configured tensors; return its external-data locations.

    Triton refuses to load a model whose config names, types or batch axis disagree with the graph; checking
    here turns that server-side load failure into an export-time error.
    """
    model = onnx.load(str(graph.path), load_external_data=False)
    initializers = {tensor.name for tensor in model.graph.initializer}
    # Graphs from IR < 4 list initializers among the inputs; they are weights, not request tensors.
    inputs = [value for value in model.graph.input if value.name not in initializers]
    _check_signature(graph, "input", graph.inputs, inputs)
    _check_signature(graph, "output", graph.outputs, list(model.graph.output))

    return [_safe_location(graph, location) for location in external_data_locations(model)]


def _check_signature(
    graph: TritonGraph, kind: str, expected: Sequence[TritonTensor], actual: Sequence[onnx.ValueInfoProto]
) -> None:
    where = f"{graph.role} graph {graph.path}"
    by_name = {value.name: value for value in actual}
    if sorted(by_name) != sorted(tensor.name for tensor in expected):
        raise ValueError(f"{where}: {kind}s are {sorted(by_name)}, config says {[t.name for t in expected]}")
    for tensor in expected:
        tensor_type = by_name[tensor.name].type.tensor_type
        dtype = _ONNX_TYPES.get(tensor_type.elem_type, f"onnx elem_type {tensor_type.elem_type}")
        if dtype != tensor.dtype:
            raise ValueError(f"{where}: {kind} {tensor.name!r} is {dtype}, config says {tensor.dtype}")
        if not tensor_type.HasField("shape"):
            continue  # shape left to inference at runtime; nothing to compare
        shape = [dim.dim_value if dim.HasField("dim_value") else -1 for dim in tensor_type.shape.dim]
        if len(shape) != len(tensor.dims) + 1:
            raise ValueError(f"{where}: {kind} {tensor.name!r} has shape {shape}, config dims {tensor.dims} + batch")
        if shape[0] != -1:
            raise ValueError(
                f"{where}: {kind} {tensor.name!r} has a fixed batch axis {shape[0]}; Triton needs it dynamic"
            )
        for axis, (have, want) in enumerate(zip(shape[1:], tensor.dims, strict=True), start=1):
            if have != -1 and want != -1 and have != want:
                raise ValueError(f"{where}: {kind} {tensor.name!r} axis {axis} is {have}, config says {want}")


def _safe_location(graph: TritonGraph, location: str) -> PurePosixPath:
    # The copy must resolve next to model.onnx exactly as the original did next to its graph, so the
    # relative location is kept; absolute or parent-relative ones cannot be reproduced inside the version
    # directory (and onnxruntime refuses them anyway).
    path = PurePosixPath(location.replace("\\", "/"))
    if not location or path.is_absolute() or ".." in path.parts or re.match(r"[A-Za-z]:", location):
        raise ValueError(f"{graph.path}: external data location {location!r} must be a path relative to the graph")
    if path == PurePosixPath(MODEL_FILENAME):
        raise ValueError(f"{graph.path}: external data location {location!r} collides with Triton's model file")
    return path


def _populate(stage: Path, graph: TritonGraph, config: str, external: Sequence[PurePosixPath]) -> None:
    version_dir = stage / VERSION
    version_dir.mkdir()
    shutil.copyfile(graph.path, version_dir / MODEL_FILENAME)
    for location in external:
        target = version_dir.joinpath(*location.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(graph.path).parent.joinpath(*location.parts), target)
    # Written last: a directory with a config but missing weights is what a crash must never leave.
    (stage / CONFIG_FILENAME).write_text(config, encoding="utf-8")


def write_for_manifest(
    model_dir: Path, manifest: Manifest, root: Path, *, max_batch_size: int, policy: BatchingPolicy | None = None
) -> list[Path]:
    """Triton models for an exported model's fp32 ONNX encoders, named `<manifest name>-image` / `-text`."""
    policy = policy or BatchingPolicy(max_batch_size=max_batch_size)
    graphs = []
    for role in ("image", "text"):
        artifact = manifest.find("onnx", role, "fp32")
        assert artifact is not None  # the manifest schema requires both fp32 graphs
        graphs.append(
            TritonGraph(
                role=role,
                path=model_dir / artifact.path,
                inputs=tuple(_triton_tensor(spec) for spec in artifact.inputs),
                outputs=tuple(_triton_tensor(spec) for spec in artifact.outputs),
            )
        )
    return write_triton_repository(root, manifest.name, graphs, policy)


def _triton_tensor(spec: TensorSpec) -> TritonTensor:
    # The manifest names the batch axis first; Triton's dims leave it out when max_batch_size > 0.
    return TritonTensor(spec.name, spec.dtype, tuple(int(d) for d in spec.shape[1:]))
