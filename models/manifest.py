"""The model repository's `manifest.json`: what export writes and the service trusts, torch-free.

One directory per model (DESIGN.md, "Model repository"): the ONNX graphs, optional TensorRT plans, the
tokenizer and this manifest. The manifest says how to feed the graphs (preprocessing, tokenizer spec), how to
turn cosines into probabilities (logit scale, bias, activation), where the model came from, which tools built
it, how closely each graph matched the PyTorch original (the parity report), and the sha256 of every file.

`load_manifest` validates the JSON against this schema and, by default, re-hashes every listed file, so a
truncated download or a flipped byte is refused at load time instead of serving wrong embeddings.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.preprocess import PreprocessConfig
from models.tokenizer import TokenizerSpec

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"

Role = Literal["image", "text", "tokenizer"]
Format = Literal["onnx", "tensorrt", "tokenizer"]
Precision = Literal["fp32", "fp16", "bf16", "int8"]
Activation = Literal["softmax", "sigmoid"]
_SHA256_LENGTH = 64
_HASH_CHUNK = 1 << 20


class ManifestError(ValueError):
    """manifest.json is missing, unreadable or does not match the schema."""


class ArtifactIntegrityError(ManifestError):
    """A file the manifest lists is missing or its bytes differ from the recorded sha256."""


class _Strict(BaseModel):
    # Unknown keys are errors: a typo in a hand-edited manifest must not be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class TensorSpec(_Strict):
    name: str
    dtype: Literal["float32", "float16", "int64", "int32"]
    shape: tuple[int | str, ...]  # symbolic axes by name ("batch")


class Artifact(_Strict):
    path: str  # relative to the model directory, POSIX separators
    role: Role
    format: Format
    precision: Precision | None = None  # None for the tokenizer
    sha256: str
    bytes: int = Field(ge=0)
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    extra_files: dict[str, str] = Field(default_factory=dict)  # external-data file -> sha256

    @field_validator("path")
    @classmethod
    def _relative_inside(cls, value: str) -> str:
        pure = PurePosixPath(value)
        if pure.is_absolute() or ".." in pure.parts or "\\" in value or not value:
            raise ValueError(f"artifact path {value!r} must be relative and stay inside the model directory")
        return value

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        if len(value) != _SHA256_LENGTH or any(c not in "0123456789abcdef" for c in value):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        return value


class Source(BaseModel):
    """Where the weights came from; loaders add their own details (weights hashes, library versions)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kind: Literal["open_clip", "open_clip_checkpoint", "hf_clip", "demo"]
    architecture: str | dict[str, Any] | None = None
    pretrained: str | None = None
    sha256: str | None = None  # of the checkpoint file, when one was loaded from disk


class TokenizerInfo(_Strict):
    file: str = TOKENIZER_FILE
    context_length: int = Field(gt=1)
    sot_token_id: int
    eot_token_id: int
    pad_token_id: int
    vocab_size: int = Field(gt=0)

    def spec(self) -> TokenizerSpec:
        return TokenizerSpec(
            context_length=self.context_length,
            sot_token_id=self.sot_token_id,
            eot_token_id=self.eot_token_id,
            pad_token_id=self.pad_token_id,
            vocab_size=self.vocab_size,
        )


class PreprocessInfo(_Strict):
    image_size: int = Field(gt=0)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Literal["bicubic", "bilinear", "nearest"]
    resize_mode: Literal["shortest", "squash"]
    apply_exif_orientation: bool = True

    def config(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.model_dump())


class ParityCheck(_Strict):
    """One graph against the PyTorch tower on the probe set, over every checked batch size."""

    artifact: str
    role: Literal["image", "text"]
    precision: Precision
    batch_sizes: tuple[int, ...]
    min_cosine: float
    max_abs_diff: float
    top1_agreement: float | None = None  # zero-shot agreement with PyTorch, where a labelled task exists
    required_min_cosine: float
    required_max_abs_diff: float | None = None
    required_top1_agreement: float | None = None
    passed: bool


class ParityReport(_Strict):
    probe_images: int
    probe_texts: int
    top1_task: str | None = None
    checks: tuple[ParityCheck, ...]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)


class TensorRTBuild(_Strict):
    """Plans are only valid on the GPU family and TensorRT version that built them."""

    directory: str  # tensorrt/<sm-arch>-trt<version>
    gpu_name: str
    compute_capability: str  # "9.0"
    tensorrt_version: str
    precision: Precision
    min_batch: int = Field(ge=1)
    opt_batch: int = Field(ge=1)
    max_batch: int = Field(ge=1)

    def runs_on(self, compute_capability: str, tensorrt_version: str) -> bool:
        return self.compute_capability == compute_capability and self.tensorrt_version == tensorrt_version


class Exporter(_Strict):
    clipserve: str
    opset: int
    exported_at: str  # ISO 8601 UTC; informational, excluded from the content hash
    seconds: float = Field(ge=0)
    libraries: dict[str, str]  # torch, onnx, onnxruntime, open_clip, transformers, tensorrt ...


class Manifest(_Strict):
    schema_version: Literal[1] = 1  # SCHEMA_VERSION; readers refuse versions they do not know
    name: str = Field(min_length=1)
    source: Source
    embed_dim: int = Field(gt=0)
    preprocess: PreprocessInfo
    tokenizer: TokenizerInfo
    logit_scale: float = Field(gt=0)
    logit_bias: float | None = None
    activation: Activation
    artifacts: tuple[Artifact, ...]
    tensorrt: tuple[TensorRTBuild, ...] = ()
    exporter: Exporter
    parity: ParityReport

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        paths = [a.path for a in self.artifacts]
        if len(set(paths)) != len(paths):
            raise ValueError("artifact paths must be unique")
        if self.tokenizer.file not in paths:
            raise ValueError(f"tokenizer file {self.tokenizer.file!r} is not among the artifacts")
        if self.activation == "sigmoid" and self.logit_bias is None:
            raise ValueError("a sigmoid model needs its logit_bias")
        for role in ("image", "text"):
            if self.find("onnx", role, "fp32") is None:
                raise ValueError(f"the fp32 ONNX {role} graph is required")
        return self

    def find(self, format: Format, role: Role, precision: Precision | None = None) -> Artifact | None:
        for artifact in self.artifacts:
            if artifact.format == format and artifact.role == role and artifact.precision == precision:
                return artifact
        return None

    def precisions(self, format: Format = "onnx") -> list[str]:
        """Precisions for which both towers exist in `format`."""
        found = [a.precision for a in self.artifacts if a.format == format and a.role == "image" and a.precision]
        return [p for p in found if self.find(format, "text", p) is not None]

    def content_hash(self) -> str:
        """Identity of what this model computes: changes whenever a file, the scoring or the inputs change.

        The label cache keys vectors by it, so a re-exported or different model never reads old vectors;
        export time, durations and tool versions are left out so that a byte-identical re-export keeps it.
        """
        payload = self.model_dump(
            mode="json", exclude={"exporter": {"exported_at", "seconds"}, "parity": True, "tensorrt": True}
        )
        # TensorRT plans are compiled, per GPU family, from the ONNX graphs the hash covers, and may be added on
        # the serving node long after export (`clipserve build-engines`); that must not move every replica's
        # label cache to a new namespace. Their reduced precision is told apart by the cache key's precision.
        payload["artifacts"] = [a for a in payload["artifacts"] if a["format"] != "tensorrt"]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=False) + "\n"


def _files_of(artifact: Artifact) -> dict[str, str]:
    return {artifact.path: artifact.sha256, **artifact.extra_files}


def verify_artifacts(manifest: Manifest, directory: Path) -> None:
    """Re-hashes every listed file; raises ArtifactIntegrityError naming the first one that differs."""
    for artifact in manifest.artifacts:
        for relative, expected in _files_of(artifact).items():
            path = directory / relative
            if not path.is_file():
                raise ArtifactIntegrityError(f"{path} is listed in {MANIFEST_FILE} but missing")
            actual = sha256_file(path)
            if actual != expected:
                raise ArtifactIntegrityError(
                    f"{path} is corrupt or was replaced: sha256 {actual[:16]}… but {MANIFEST_FILE} records "
                    f"{expected[:16]}…; re-export the model"
                )


def read_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / MANIFEST_FILE
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except FileNotFoundError as error:
        raise ManifestError(f"{path} does not exist; export the model first (clipserve export)") from error
    except ValidationError as error:
        raise ManifestError(f"{path} is not a valid clipserve manifest: {error}") from error


def load_manifest(directory: str | Path, *, verify: bool = True) -> Manifest:
    """The validated manifest of one model directory; with `verify`, every file's sha256 is checked too."""
    manifest = read_manifest(directory)
    if verify:
        verify_artifacts(manifest, Path(directory))
    return manifest
