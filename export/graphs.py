"""ONNX graphs of the two towers, and their fp16 and int8 variants.

Each tower is exported on its own (`image.onnx`: float pixels [B,3,S,S] -> embeddings [B,D]; `text.onnx`:
int64 token ids [B,L] -> embeddings [B,D]; both L2-normalised inside the graph) with the batch axis dynamic
and everything else fixed, because fixed spatial and sequence sizes let ONNX Runtime and TensorRT plan
memory once. We use torch's documented default exporter (torch.export-based, `dynamo=True`); the
TorchScript one is deprecated and slated for removal.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from models.manifest import TensorSpec

OPSET = 18
BATCH_AXIS = "batch"
OUTPUT_NAME = "embeddings"
MAX_EXPORT_BATCH = 4096
# protobuf cannot serialise a message over 2 GiB; well before that, weights go to one external file.
EXTERNAL_DATA_BYTES = 1_800_000_000


@dataclass(frozen=True)
class GraphSpec:
    role: str  # "image" | "text"
    input_name: str
    input_dtype: str  # numpy dtype name
    sample_shape: tuple[int, ...]  # without the batch axis

    def inputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec(name=self.input_name, dtype=self.input_dtype, shape=(BATCH_AXIS, *self.sample_shape)),)  # type: ignore[arg-type]

    def outputs(self, embed_dim: int) -> tuple[TensorSpec, ...]:
        return (TensorSpec(name=OUTPUT_NAME, dtype="float32", shape=(BATCH_AXIS, embed_dim)),)


def image_spec(image_size: int) -> GraphSpec:
    return GraphSpec("image", "pixels", "float32", (3, image_size, image_size))


def text_spec(context_length: int) -> GraphSpec:
    return GraphSpec("text", "token_ids", "int64", (context_length,))


def _parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _quietly():
    # The exporter prints its own step banners to stdout; ours go through the CLI's progress display.
    return contextlib.redirect_stdout(io.StringIO())


def export_tower(tower: torch.nn.Module, example: np.ndarray, path: Path, spec: GraphSpec) -> Path:
    """Writes one tower as ONNX (opset 18, dynamic batch) and checks the file with onnx.checker."""
    tower = tower.eval()
    batch = torch.export.Dim(BATCH_AXIS, min=1, max=MAX_EXPORT_BATCH)
    # The example must have more than one row: torch.export specialises a size-1 axis to a constant.
    inputs = torch.from_numpy(np.ascontiguousarray(example[:2] if len(example) >= 2 else np.repeat(example, 2, 0)))
    external = _parameter_bytes(tower) > EXTERNAL_DATA_BYTES
    with torch.inference_mode(False), torch.no_grad(), _quietly():
        torch.onnx.export(
            tower,
            (inputs,),
            str(path),
            input_names=[spec.input_name],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            opset_version=OPSET,
            dynamo=True,
            external_data=external,
            verbose=False,
        )
    _strip_debug_metadata(path)
    # The path form of the checker handles graphs with external data too.
    onnx.checker.check_model(str(path), full_check=True)
    return path


def _strip_debug_metadata(path: Path) -> None:
    """Drops the exporter's per-node debug records (Python stack traces with this checkout's file paths, FX
    node dumps): they change with where the code lives, which would make identical exports differ by byte."""
    model = onnx.load(str(path), load_external_data=False)  # external tensors keep their references
    del model.graph.metadata_props[:]
    for node in model.graph.node:
        del node.metadata_props[:]
    onnx.save_model(model, str(path))


def _save(model: onnx.ModelProto, path: Path) -> None:
    large = model.ByteSize() > EXTERNAL_DATA_BYTES
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location=f"{path.name}.data" if large else None,
    )


def to_fp16(source: Path, target: Path) -> Path:
    """fp16 weights and compute, float32 inputs and outputs (casts at the edges, so callers see one contract).

    ONNX Runtime's converter keeps ops that are unsafe or unsupported in fp16 (e.g. Range, resize indices)
    in float32 with casts around them, and clamps constants to the fp16 range (the attention mask's -inf
    stand-ins stay finite).
    """
    import onnx_ir
    from onnx_ir.passes.common import TopologicalSortPass
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = onnx_ir.from_proto(convert_float_to_float16(onnx.load(str(source)), keep_io_types=True))
    # The converter appends its input casts after the nodes that read them; ONNX requires sorted nodes.
    TopologicalSortPass()(converted)
    _save(onnx_ir.to_proto(converted), target)
    onnx.checker.check_model(str(target))
    return target


def to_int8(source: Path, target: Path) -> Path:
    """Dynamic int8 quantisation (ONNX Runtime): int8 weights, activations quantised per batch at run time.

    No calibration data is needed, which is why it is the int8 variant we can produce for any model; the
    token-embedding Gather is quantised too, which shrinks the text graph about 4x.

    Weights are quantised per output channel to 7 bits (`reduce_range`). On x86 CPUs without VNNI (AVX2 only,
    e.g. AMD Zen 3) ONNX Runtime's u8s8 kernels add pairs of products in int16, which saturates with full 8-bit
    weights: there, plain settings gave random-init ViT-B-32 a min image cosine of 0.983, under the gate, while a
    VNNI machine gave 0.9997 for the same model. With these settings it is 0.9995 on the AVX2 machine, at the
    same speed (export/REPORT.md). The gate measures the CPU it runs on; these settings narrow the gap to others.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantiser logs a generic "consider pre-processing" warning on the root logger for every graph.
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
            use_external_data_format=source.stat().st_size > EXTERNAL_DATA_BYTES,
        )
    finally:
        logging.disable(logging.NOTSET)
    onnx.checker.check_model(str(target))
    return target


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    # Weights can live in initializers, sparse initializers, Constant-style attributes, subgraphs of
    # control-flow nodes and local functions; any of them may point at external data.
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        sparse_tensors = [attribute.sparse_tensor] if attribute.HasField("sparse_tensor") else []
        for sparse in [*sparse_tensors, *attribute.sparse_tensors]:
            yield sparse.values
            yield sparse.indices
        if attribute.HasField("g"):
            yield from _graph_tensors(attribute.g)
        for subgraph in attribute.graphs:
            yield from _graph_tensors(subgraph)


def external_data_locations(model: onnx.ModelProto) -> list[str]:
    """Distinct external-data file locations (relative to the graph file), in first-use order."""
    locations = [ExternalDataInfo(t).location for t in all_tensors(model) if uses_external_data(t)]
    return list(dict.fromkeys(locations))


def external_data_files(path: Path) -> list[Path]:
    """The external-data files a graph references (empty for self-contained graphs)."""
    model = onnx.load(str(path), load_external_data=False)
    return [path.parent / location for location in external_data_locations(model)]
