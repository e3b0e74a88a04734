"""models.manifest: the schema, its validation, and sha256 verification of every artifact on load.

Runs on the committed demo repository (torch-free, like the service that reads it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from models.demo.config import EXPORT_NAME, REPOSITORY_DIR
from models.manifest import (
    MANIFEST_FILE,
    Artifact,
    ArtifactIntegrityError,
    Manifest,
    ManifestError,
    TensorRTBuild,
    load_manifest,
    read_manifest,
)

DEMO_DIR = REPOSITORY_DIR / EXPORT_NAME


@pytest.fixture
def demo_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(DEMO_DIR, tmp_path / EXPORT_NAME))


def _raw(directory: Path) -> dict:
    return json.loads((directory / MANIFEST_FILE).read_text())


def _write(directory: Path, raw: dict) -> None:
    (directory / MANIFEST_FILE).write_text(json.dumps(raw))


def test_committed_demo_manifest_loads_and_verifies() -> None:
    manifest = load_manifest(DEMO_DIR)
    assert manifest.schema_version == 1 and manifest.name == EXPORT_NAME
    assert manifest.embed_dim == 64 and manifest.preprocess.image_size == 64
    assert manifest.tokenizer.context_length == 32 and manifest.tokenizer.spec().sot_token_id == 49406
    assert manifest.activation == "softmax" and manifest.logit_scale > 1
    assert manifest.precisions() == ["fp32", "int8"]
    assert manifest.find("onnx", "image", "int8").path == "image.int8.onnx"
    assert manifest.find("onnx", "image", "fp16") is None
    assert manifest.preprocess.config().mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert manifest.parity.passed and {c.precision for c in manifest.parity.checks} == {"fp32", "int8"}


@pytest.mark.parametrize("artifact", [a.path for a in read_manifest(DEMO_DIR).artifacts])
def test_any_flipped_byte_in_any_artifact_is_detected(demo_copy: Path, artifact: str) -> None:
    path = demo_copy / artifact
    data = bytearray(path.read_bytes())
    for position in (0, len(data) // 2, len(data) - 1):
        corrupt = data.copy()
        corrupt[position] ^= 0x01
        path.write_bytes(bytes(corrupt))
        with pytest.raises(ArtifactIntegrityError, match=artifact.replace(".", r"\.")):
            load_manifest(demo_copy)
    path.write_bytes(bytes(data))
    load_manifest(demo_copy)  # restored: verifies again


def test_truncated_and_missing_files_are_detected(demo_copy: Path) -> None:
    graph = demo_copy / "text.onnx"
    graph.write_bytes(graph.read_bytes()[:-10])
    with pytest.raises(ArtifactIntegrityError, match="corrupt"):
        load_manifest(demo_copy)
    graph.unlink()
    with pytest.raises(ArtifactIntegrityError, match="missing"):
        load_manifest(demo_copy)
    assert read_manifest(demo_copy).name == EXPORT_NAME  # reading without verification still works
    load_manifest(demo_copy, verify=False)


def test_missing_or_unparseable_manifest(tmp_path: Path, demo_copy: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nowhere")
    (demo_copy / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ManifestError, match="not a valid clipserve manifest"):
        load_manifest(demo_copy)


def _mutations() -> dict[str, object]:
    def unknown_key(raw):
        raw["logit_scael"] = 3.0

    def future_schema(raw):
        raw["schema_version"] = 2

    def escaping_path(raw):
        raw["artifacts"][0]["path"] = "../../etc/passwd"

    def absolute_path(raw):
        raw["artifacts"][0]["path"] = "/etc/passwd"

    def bad_digest(raw):
        raw["artifacts"][0]["sha256"] = "XYZ"

    def sigmoid_without_bias(raw):
        raw["activation"] = "sigmoid"

    def no_fp32_image(raw):
        raw["artifacts"] = [a for a in raw["artifacts"] if not (a["role"] == "image" and a["precision"] == "fp32")]

    def duplicate_paths(raw):
        raw["artifacts"].append(raw["artifacts"][0])

    def no_tokenizer(raw):
        raw["artifacts"] = [a for a in raw["artifacts"] if a["role"] != "tokenizer"]

    def negative_scale(raw):
        raw["logit_scale"] = -1.0

    def bad_interpolation(raw):
        raw["preprocess"]["interpolation"] = "lanczos"

    def unknown_precision(raw):
        raw["artifacts"][0]["precision"] = "int4"

    return {f.__name__: f for f in locals().values() if callable(f)}


@pytest.mark.parametrize("mutation", sorted(_mutations()))
def test_schema_violations_are_refused(demo_copy: Path, mutation: str) -> None:
    raw = _raw(demo_copy)
    _mutations()[mutation](raw)
    _write(demo_copy, raw)
    with pytest.raises(ManifestError):
        read_manifest(demo_copy)


def test_content_hash_ignores_when_but_not_what() -> None:
    manifest = read_manifest(DEMO_DIR)
    reexported = manifest.model_copy(
        update={"exporter": manifest.exporter.model_copy(update={"exported_at": "2030-01-01T00:00:00+00:00"})}
    )
    assert reexported.content_hash() == manifest.content_hash()
    changed_graph = manifest.model_copy(
        update={"artifacts": (manifest.artifacts[0].model_copy(update={"sha256": "0" * 64}), *manifest.artifacts[1:])}
    )
    assert changed_graph.content_hash() != manifest.content_hash()
    rescaled = manifest.model_copy(update={"logit_scale": manifest.logit_scale * 2})
    assert rescaled.content_hash() != manifest.content_hash()


def test_content_hash_stays_when_tensorrt_plans_are_added() -> None:
    """Plans built on the serving node (clipserve build-engines) must not move the label cache's namespace."""
    manifest = read_manifest(DEMO_DIR)
    build = h200_build("10.16.1")
    plan = Artifact(
        path="tensorrt/sm90-trt10.16.1/image.plan", role="image", format="tensorrt", sha256="1" * 64, bytes=1
    )
    with_plans = manifest.model_copy(update={"tensorrt": (build,), "artifacts": (*manifest.artifacts, plan)})
    assert with_plans.content_hash() == manifest.content_hash()


def test_manifest_round_trips_through_json() -> None:
    manifest = read_manifest(DEMO_DIR)
    assert Manifest.model_validate_json(manifest.to_json()) == manifest


def h200_build(tensorrt_version: str) -> TensorRTBuild:
    return TensorRTBuild(
        directory=f"tensorrt/sm90-trt{tensorrt_version}",
        gpu_name="NVIDIA H200",
        compute_capability="9.0",
        tensorrt_version=tensorrt_version,
        precision="fp16",
        min_batch=1,
        opt_batch=32,
        max_batch=64,
    )


def test_tensorrt_build_knows_where_its_plans_run() -> None:
    build = h200_build("10.7.0")
    assert build.runs_on("9.0", "10.7.0")
    assert not build.runs_on("8.9", "10.7.0")  # another GPU family
    assert not build.runs_on("9.0", "10.8.0")  # another TensorRT: plans are not portable across versions
