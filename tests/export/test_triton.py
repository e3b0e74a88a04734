"""The Triton model repository writer: configs checked field by field, copied graphs run unchanged.

No Triton model_config proto is installed, so config.pbtxt is read back with a small protobuf-text-format
parser below (scalars, quoted strings, enums, `[ ... ]` lists, nested messages, `#` comments). Enums parse
to `Enum`, not `str`, so a quoted enum or a bare string in the generated file fails the comparison.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.triton import (
    BatchingPolicy,
    TritonGraph,
    TritonTensor,
    render_config,
    triton_data_type,
    write_triton_repository,
)

EMBED_DIM = 512
CONTEXT = 77
VOCAB = 64  # the tiny text graph's embedding table; real CLIP has 49,408 rows

PIXELS = TritonTensor("pixels", "float32", (3, 224, 224))
TOKEN_IDS = TritonTensor("token_ids", "int64", (CONTEXT,))
EMBEDDINGS = TritonTensor("embeddings", "float32", (EMBED_DIM,))


# --- a protobuf text format reader, enough for config.pbtxt -------------------------------------------


@dataclass(frozen=True)
class Enum:
    value: str


Message = dict[str, list[Any]]

_TOKEN = re.compile(
    r"""(?P<skip>\s+|\#[^\n]*)
      | (?P<string>"(?:[^"\\\n]|\\.)*")
      | (?P<number>-?\d+(?:\.\d+)?)
      | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
      | (?P<punct>[{}\[\]:,])""",
    re.VERBOSE,
)
_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "'": "'", "\\": "\\"}


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.lastgroup is None:
            raise SyntaxError(f"unexpected character {text[position]!r} at offset {position}")
        position = match.end()
        if match.lastgroup != "skip":
            tokens.append((match.lastgroup, match.group()))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.index = 0

    def peek(self) -> str | None:
        return self.tokens[self.index][1] if self.index < len(self.tokens) else None

    def take(self, expected: str | None = None) -> tuple[str, str]:
        if self.index >= len(self.tokens):
            raise SyntaxError(f"unexpected end of input, expected {expected or 'a token'}")
        kind, text = self.tokens[self.index]
        if expected is not None and text != expected:
            raise SyntaxError(f"expected {expected!r}, got {text!r}")
        self.index += 1
        return kind, text

    def message(self, closing: str | None) -> Message:
        fields: Message = {}
        while self.peek() != closing:
            kind, name = self.take()
            if kind != "ident":
                raise SyntaxError(f"expected a field name, got {name!r}")
            # The colon is optional only before a message or a list of messages.
            has_colon = self.peek() == ":"
            if has_colon:
                self.take(":")
            elif self.peek() not in ("{", "["):
                raise SyntaxError(f"scalar field {name!r} needs a ':'")
            if self.peek() == "[":
                values = self.list()
                if not has_colon and not all(isinstance(value, dict) for value in values):
                    raise SyntaxError(f"list of scalars {name!r} needs a ':'")
            else:
                values = [self.value()]
            fields.setdefault(name, []).extend(values)
        if closing is not None:
            self.take(closing)
        return fields

    def list(self) -> list[Any]:
        self.take("[")
        values: list[Any] = []
        while self.peek() != "]":
            values.append(self.value())
            if self.peek() != "]":
                self.take(",")
        self.take("]")
        return values

    def value(self) -> Any:
        kind, text = self.take()
        if text == "{":
            return self.message("}")
        if kind == "string":
            return re.sub(r"\\(.)", lambda match: _ESCAPES[match.group(1)], text[1:-1])
        if kind == "number":
            return float(text) if "." in text else int(text)
        if kind == "ident":
            return Enum(text)
        raise SyntaxError(f"unexpected {text!r}")


def parse_pbtxt(text: str) -> Message:
    return _Parser(text).message(None)


# --- tiny real ONNX encoders -----------------------------------------------------------------------------


def _save(model: onnx.ModelProto, path: Path, external_location: str | None) -> Path:
    onnx.checker.check_model(model)
    if external_location is None:
        onnx.save_model(model, path)
    else:
        # onnx writes the data file but does not create directories named in its location.
        (path.parent / external_location).parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(
            model,
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=external_location,
            size_threshold=0,
        )
    return path


def _model(nodes: list[onnx.NodeProto], inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "tower", inputs, outputs, initializer=initializers)
    # opset 17 keeps ReduceMean's axes an attribute; IR 8 is read by every onnxruntime this project allows.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def image_onnx(path: Path, external_location: str | None = None) -> Path:
    """pixels [B, 3, 224, 224] -> mean over H, W -> [B, 3] @ W[3, 512] -> embeddings [B, 512]."""
    weight = np.random.default_rng(0).standard_normal((3, EMBED_DIM)).astype(np.float32)
    model = _model(
        [
            helper.make_node("ReduceMean", ["pixels"], ["pooled"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["pooled", "projection"], ["embeddings"]),
        ],
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", EMBED_DIM])],
        [numpy_helper.from_array(weight, "projection")],
    )
    return _save(model, path, external_location)


def text_onnx(path: Path, external_location: str | None = None) -> Path:
    """token_ids [B, 77] -> Gather from table[64, 512] -> mean over tokens -> embeddings [B, 512]."""
    table = np.random.default_rng(1).standard_normal((VOCAB, EMBED_DIM)).astype(np.float32)
    model = _model(
        [
            helper.make_node("Gather", ["table", "token_ids"], ["per_token"]),
            helper.make_node("ReduceMean", ["per_token"], ["embeddings"], axes=[1], keepdims=0),
        ],
        [helper.make_tensor_value_info("token_ids", TensorProto.INT64, ["batch", CONTEXT])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", EMBED_DIM])],
        [numpy_helper.from_array(table, "table")],
    )
    return _save(model, path, external_location)


def image_graph(path: Path) -> TritonGraph:
    return TritonGraph("image", path, (PIXELS,), (EMBEDDINGS,))


def text_graph(path: Path) -> TritonGraph:
    return TritonGraph("text", path, (TOKEN_IDS,), (EMBEDDINGS,))


def run(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["embeddings"], feed)[0]


def pixels_batch() -> dict[str, np.ndarray]:
    return {"pixels": np.random.default_rng(2).standard_normal((2, 3, 224, 224)).astype(np.float32)}


def tokens_batch() -> dict[str, np.ndarray]:
    return {"token_ids": np.random.default_rng(3).integers(0, VOCAB, size=(3, CONTEXT), dtype=np.int64)}


def expected_config(
    name: str, platform: str, filename: str, inputs: list[tuple[str, str, list[int]]], policy: BatchingPolicy
) -> Message:
    def tensor(tensor_name: str, data_type: str, dims: list[int]) -> Message:
        return {"name": [tensor_name], "data_type": [Enum(data_type)], "dims": dims}

    return {
        "name": [name],
        "platform": [platform],
        "default_model_filename": [filename],
        "max_batch_size": [policy.max_batch_size],
        "input": [tensor(*spec) for spec in inputs],
        "output": [tensor("embeddings", "TYPE_FP32", [EMBED_DIM])],
        "dynamic_batching": [
            {
                "preferred_batch_size": list(policy.resolved_preferred_batch_sizes()),
                "max_queue_delay_microseconds": [policy.max_queue_delay_microseconds],
            }
        ],
        "instance_group": [{"count": [policy.instance_count], "kind": [Enum(policy.instance_kind)]}],
    }


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "src"
    src.mkdir()
    return {"image": image_onnx(src / "image.onnx"), "text": text_onnx(src / "text.onnx")}


# --- the parser itself -----------------------------------------------------------------------------------


def test_parser_reads_the_subset_config_pbtxt_uses():
    text = """
    # a comment
    name: "a \\"quoted\\" name"  # trailing comment
    count: -3
    kind: KIND_GPU
    dims: [ 1, 2, 3 ]
    input [ { name: "x" dims: [ 4 ] }, { name: "y" } ]
    nested { inner { flag: true } }
    repeated: 1
    repeated: 2
    """
    assert parse_pbtxt(text) == {
        "name": ['a "quoted" name'],
        "count": [-3],
        "kind": [Enum("KIND_GPU")],
        "dims": [1, 2, 3],
        "input": [{"name": ["x"], "dims": [4]}, {"name": ["y"]}],
        "nested": [{"inner": [{"flag": [Enum("true")]}]}],
        "repeated": [1, 2],
    }
    for broken in ('name "x"', "dims [ 1 ]", "input [ { name: 1 ", "name: @"):
        with pytest.raises(SyntaxError):
            parse_pbtxt(broken)


# --- configs, field by field ----------------------------------------------------------------------------


def test_written_configs_field_by_field(tmp_path: Path, sources: dict[str, Path]):
    policy = BatchingPolicy()
    root = tmp_path / "repo"
    written = write_triton_repository(
        root, "clip-vit-b-32", [image_graph(sources["image"]), text_graph(sources["text"])], policy
    )
    assert written == [root / "clip-vit-b-32-image" / "config.pbtxt", root / "clip-vit-b-32-text" / "config.pbtxt"]

    image = parse_pbtxt(written[0].read_text())
    assert image["name"] == ["clip-vit-b-32-image"]  # must equal the directory name or Triton refuses it
    assert image["platform"] == ["onnxruntime_onnx"]
    assert image["default_model_filename"] == ["model.onnx"]
    assert image["max_batch_size"] == [64]
    [pixels] = image["input"]
    assert pixels == {"name": ["pixels"], "data_type": [Enum("TYPE_FP32")], "dims": [3, 224, 224]}
    [embeddings] = image["output"]
    assert embeddings == {"name": ["embeddings"], "data_type": [Enum("TYPE_FP32")], "dims": [512]}
    [batching] = image["dynamic_batching"]
    assert batching["preferred_batch_size"] == [64]  # default: just the maximum
    assert batching["max_queue_delay_microseconds"] == [2000]
    [group] = image["instance_group"]
    assert group == {"count": [1], "kind": [Enum("KIND_GPU")]}
    assert set(image) == {
        "name",
        "platform",
        "default_model_filename",
        "max_batch_size",
        "input",
        "output",
        "dynamic_batching",
        "instance_group",
    }

    text = parse_pbtxt(written[1].read_text())
    assert text == expected_config(
        "clip-vit-b-32-text", "onnxruntime_onnx", "model.onnx", [("token_ids", "TYPE_INT64", [77])], policy
    )
    assert written[0].read_text().startswith("# Generated by `clipserve export`")


def test_render_config_follows_a_custom_policy(tmp_path: Path):
    policy = BatchingPolicy(
        max_batch_size=32,
        preferred_batch_sizes=(16, 4, 8, 16),
        max_queue_delay_microseconds=500,
        instance_count=3,
        instance_kind="KIND_CPU",
    )
    config = parse_pbtxt(render_config("clip-image", image_graph(tmp_path / "unused.onnx"), policy))
    assert config == expected_config(
        "clip-image", "onnxruntime_onnx", "model.onnx", [("pixels", "TYPE_FP32", [3, 224, 224])], policy
    )
    assert config["max_batch_size"] == [32]
    assert config["dynamic_batching"][0]["preferred_batch_size"] == [4, 8, 16]  # sorted, deduplicated
    assert config["dynamic_batching"][0]["max_queue_delay_microseconds"] == [500]
    assert config["instance_group"] == [{"count": [3], "kind": [Enum("KIND_CPU")]}]


def test_render_config_fp16_and_int32_tensors(tmp_path: Path):
    graph = TritonGraph(
        "text",
        tmp_path / "unused.onnx",
        (TritonTensor("token_ids", "int32", (77,)),),
        (TritonTensor("embeddings", "float16", (768,)),),
    )
    config = parse_pbtxt(render_config("clip-text", graph, BatchingPolicy()))
    assert config["input"][0]["data_type"] == [Enum("TYPE_INT32")]
    assert config["output"][0] == {"name": ["embeddings"], "data_type": [Enum("TYPE_FP16")], "dims": [768]}


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("float32", "TYPE_FP32"), ("int64", "TYPE_INT64"), ("float16", "TYPE_FP16"), ("int32", "TYPE_INT32")],
)
def test_triton_data_type(dtype: str, expected: str):
    assert triton_data_type(dtype) == expected


@pytest.mark.parametrize("dtype", ["float64", "uint8", "bool", "fp32", "FLOAT32", "TYPE_FP32", ""])
def test_unknown_dtype_raises(dtype: str, tmp_path: Path):
    with pytest.raises(ValueError, match="unsupported dtype"):
        triton_data_type(dtype)
    graph = TritonGraph("image", tmp_path / "x.onnx", (TritonTensor("pixels", dtype, (3,)),), (EMBEDDINGS,))
    with pytest.raises(ValueError, match="unsupported dtype"):
        render_config("clip-image", graph, BatchingPolicy())


# --- copied graphs ---------------------------------------------------------------------------------------


def test_copied_onnx_runs_like_the_source(tmp_path: Path, sources: dict[str, Path]):
    root = tmp_path / "repo"
    write_triton_repository(
        root, "clip", [image_graph(sources["image"]), text_graph(sources["text"])], BatchingPolicy()
    )
    for role, feed in (("image", pixels_batch()), ("text", tokens_batch())):
        copied = root / f"clip-{role}" / "1" / "model.onnx"
        assert sorted(p.name for p in copied.parent.iterdir()) == ["model.onnx"]
        expected = run(sources[role], feed)
        assert expected.shape == (len(next(iter(feed.values()))), EMBED_DIM)
        np.testing.assert_array_equal(run(copied, feed), expected)


@pytest.mark.parametrize("location", ["text.onnx.data", "weights/text.bin"])
def test_external_data_is_copied_and_still_resolves(tmp_path: Path, location: str):
    src = tmp_path / "src"
    src.mkdir()
    source = text_onnx(src / "text.onnx", external_location=location)
    assert (src / location).stat().st_size >= VOCAB * EMBED_DIM * 4  # the weights really are outside the graph
    feed = tokens_batch()
    expected = run(source, feed)

    root = tmp_path / "repo"
    write_triton_repository(root, "clip", [text_graph(source)], BatchingPolicy())
    version_dir = root / "clip-text" / "1"
    assert (version_dir / location).read_bytes() == (src / location).read_bytes()
    # The graph itself is copied byte for byte, so its reference to `location` is unchanged.
    assert (version_dir / "model.onnx").read_bytes() == source.read_bytes()

    # Remove the source so that a graph still reading the original weights would fail.
    for path in sorted(src.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    np.testing.assert_array_equal(run(version_dir / "model.onnx", feed), expected)


# --- rewriting -------------------------------------------------------------------------------------------


def test_rewrite_replaces_the_previous_repository(tmp_path: Path, sources: dict[str, Path]):
    root = tmp_path / "repo"
    graphs = [image_graph(sources["image"]), text_graph(sources["text"])]
    write_triton_repository(root, "clip", graphs, BatchingPolicy(max_batch_size=8))
    stale = [root / "clip-image" / "1" / "old-weights.onnx.data", root / "clip-text" / "2" / "model.onnx"]
    for path in stale:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"stale")
    neighbour = root / "another-model" / "config.pbtxt"
    neighbour.parent.mkdir()
    neighbour.write_text('name: "another-model"\n')

    write_triton_repository(root, "clip", graphs, BatchingPolicy(max_batch_size=16))

    assert not any(path.exists() for path in stale)
    assert not (root / "clip-text" / "2").exists()
    assert parse_pbtxt((root / "clip-image" / "config.pbtxt").read_text())["max_batch_size"] == [16]
    assert neighbour.read_text() == 'name: "another-model"\n'  # other models in the repository are kept
    assert sorted(p.name for p in root.iterdir()) == ["another-model", "clip-image", "clip-text"]  # no temp dirs


def test_failed_write_leaves_the_previous_repository_intact(tmp_path: Path, sources: dict[str, Path]):
    root = tmp_path / "repo"
    write_triton_repository(root, "clip", [image_graph(sources["image"])], BatchingPolicy(max_batch_size=8))
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}

    # A graph whose external weights are gone: it inspects fine, and copying it fails halfway through the write.
    text = text_onnx(tmp_path / "text.onnx", external_location="text.onnx.data")
    (tmp_path / "text.onnx.data").unlink()
    with pytest.raises(FileNotFoundError):
        write_triton_repository(
            root,
            "clip",
            [image_graph(sources["image"]), text_graph(text)],
            BatchingPolicy(max_batch_size=16),
        )
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in root.iterdir()) == ["clip-image"]


# --- validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "clip model", "clip/vit", "../clip", ".", "..", ".hidden", "clïp", 'a"b', "a\nb"])
def test_invalid_model_name_raises(name: str, tmp_path: Path, sources: dict[str, Path]):
    with pytest.raises(ValueError, match="invalid Triton model name"):
        write_triton_repository(tmp_path / "repo", name, [image_graph(sources["image"])], BatchingPolicy())
    with pytest.raises(ValueError, match="invalid Triton model name"):
        render_config(name, image_graph(sources["image"]), BatchingPolicy())
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("name", ["clip", "ViT-B-32_openai", "clip.v2", "0clip", "_clip"])
def test_valid_model_names(name: str, tmp_path: Path, sources: dict[str, Path]):
    [config] = write_triton_repository(tmp_path, name, [image_graph(sources["image"])], BatchingPolicy())
    assert parse_pbtxt(config.read_text())["name"] == [f"{name}-image"]


def test_graph_that_disagrees_with_its_onnx_file_raises(tmp_path: Path, sources: dict[str, Path]):
    good = image_graph(sources["image"])
    wrong = [
        replace(good, inputs=(replace(PIXELS, name="image"),)),
        replace(good, inputs=(replace(PIXELS, dtype="float16"),)),
        replace(good, inputs=(replace(PIXELS, dims=(3, 256, 256)),)),
        replace(good, inputs=(replace(PIXELS, dims=(224, 224)),)),
        replace(good, outputs=(replace(EMBEDDINGS, dims=(768,)),)),
        replace(good, outputs=(EMBEDDINGS, TritonTensor("logits", "float32", (10,)))),
    ]
    for graph in wrong:
        with pytest.raises(ValueError):
            write_triton_repository(tmp_path / "repo", "clip", [graph], BatchingPolicy())
    assert not (tmp_path / "repo").exists()


def test_fixed_batch_axis_raises(tmp_path: Path):
    model = onnx.load(str(image_onnx(tmp_path / "image.onnx")))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save_model(model, tmp_path / "fixed.onnx")
    with pytest.raises(ValueError, match="batch axis"):
        write_triton_repository(tmp_path / "repo", "clip", [image_graph(tmp_path / "fixed.onnx")], BatchingPolicy())


def test_external_data_outside_the_graph_directory_raises(tmp_path: Path):
    source = text_onnx(tmp_path / "text.onnx", external_location="text.onnx.data")
    model = onnx.load(str(source), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../elsewhere/text.onnx.data"
    onnx.save_model(model, tmp_path / "escaping.onnx")
    with pytest.raises(ValueError, match="relative"):
        write_triton_repository(tmp_path / "repo", "clip", [text_graph(tmp_path / "escaping.onnx")], BatchingPolicy())


def test_bad_graphs_and_policies_raise(tmp_path: Path, sources: dict[str, Path]):
    image = image_graph(sources["image"])
    with pytest.raises(ValueError, match="role"):
        render_config("clip-audio", replace(image, role="audio"), BatchingPolicy())
    with pytest.raises(ValueError, match="dims"):
        render_config("clip-image", replace(image, inputs=(replace(PIXELS, dims=()),)), BatchingPolicy())
    with pytest.raises(ValueError, match="once"):
        write_triton_repository(tmp_path / "repo", "clip", [image, image], BatchingPolicy())
    with pytest.raises(ValueError, match="no graphs"):
        write_triton_repository(tmp_path / "repo", "clip", [], BatchingPolicy())
    for bad in (
        {"max_batch_size": 0},
        {"max_batch_size": 8, "preferred_batch_sizes": (16,)},
        {"preferred_batch_sizes": (0,)},
        {"max_queue_delay_microseconds": -1},
        {"instance_count": 0},
        {"instance_kind": "KIND_TPU"},
    ):
        with pytest.raises(ValueError):
            BatchingPolicy(**bad)
