"""One export: a loaded model in, one verified model directory out (DESIGN.md, "Model repository").

Everything is written into a staging directory beside the target; the parity gate runs on the staged graphs;
the manifest is written last and read back with full sha256 verification; only then does the staging
directory replace the target (rename), so a failed or interrupted export never leaves a half-written model
where the service looks, and re-running into an existing directory is safe.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from export import graphs, parity, probes
from export.files import staged_directory
from export.tensorrt_build import EngineSpec
from export.tensorrt_plans import TensorRTOptions, build_and_record
from models.manifest import (
    MANIFEST_FILE,
    TOKENIZER_FILE,
    Artifact,
    Exporter,
    Manifest,
    ParityCheck,
    ParityReport,
    PreprocessInfo,
    Source,
    TensorRTBuild,
    TokenizerInfo,
    load_manifest,
    sha256_file,
)
from models.tokenizer import ClipTokenizer, open_clip_tokenizer_json
from models.zoo import LoadedModel

FORMATS = ("onnx", "onnx-fp16", "onnx-int8", "tensorrt")
DEFAULT_FORMATS = ("onnx", "onnx-fp16", "onnx-int8")
_VARIANTS = {"onnx-fp16": "fp16", "onnx-int8": "int8"}  # format -> precision
_CONVERTERS = {"fp16": graphs.to_fp16, "int8": graphs.to_int8}
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_LIBRARIES = ("torch", "onnx", "onnxruntime", "onnxscript", "open_clip_torch", "transformers", "numpy")
# Keys of a loader's source record that hold local paths: they differ per machine, so only the file name is
# kept (the sha256 beside them identifies the file), which keeps manifests reproducible across checkouts.
_LOCAL_PATH_KEYS = ("path", "directory")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    manifest: Manifest
    seconds: float
    steps: dict[str, float] = field(default_factory=dict)


def graph_file(role: str, precision: str) -> str:
    return f"{role}.onnx" if precision == "fp32" else f"{role}.{precision}.onnx"


def check_name(name: str) -> str:
    if not _NAME_PATTERN.match(name):
        raise ValueError(f"model name {name!r}: use letters, digits, '.', '_' and '-' (it becomes a directory name)")
    return name


def parse_formats(text: str | Sequence[str]) -> tuple[str, ...]:
    items = [f.strip() for f in (text.split(",") if isinstance(text, str) else text) if f.strip()]
    unknown = [f for f in items if f not in FORMATS]
    if unknown or not items:
        raise ValueError(f"unknown format(s) {unknown or items}; choose from {', '.join(FORMATS)}")
    if "onnx" not in items:
        items.insert(0, "onnx")  # every variant and engine is derived from, and gated like, the fp32 graph
    return tuple(dict.fromkeys(items))


def _library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _portable_source(source: dict[str, Any]) -> Source:
    portable = {k: (Path(v).name if k in _LOCAL_PATH_KEYS and isinstance(v, str) else v) for k, v in source.items()}
    return Source.model_validate(portable)


def _artifact(directory: Path, relative: str, role: str, fmt: str, precision: str | None, **extra: Any) -> Artifact:
    path = directory / relative
    return Artifact(
        path=relative,
        role=role,  # type: ignore[arg-type]
        format=fmt,  # type: ignore[arg-type]
        precision=precision,  # type: ignore[arg-type]
        sha256=sha256_file(path),
        bytes=path.stat().st_size,
        **extra,
    )


def _graph_artifact(directory: Path, relative: str, spec: graphs.GraphSpec, precision: str, dim: int) -> Artifact:
    external = graphs.external_data_files(directory / relative)
    return _artifact(
        directory,
        relative,
        spec.role,
        "onnx",
        precision,
        inputs=spec.inputs(),
        outputs=spec.outputs(dim),
        extra_files={p.relative_to(directory).as_posix(): sha256_file(p) for p in external},
    )


class _Steps:
    """Times each step and reports it, so long exports show where they are."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress or (lambda message: None)
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        self.progress(f"{label} ...")
        begin = time.perf_counter()
        yield
        self.seconds[label] = time.perf_counter() - begin
        self.progress(f"{label}: {self.seconds[label]:.1f} s")


def export_model(
    model: LoadedModel,
    name: str,
    repository: Path,
    *,
    formats: Sequence[str] = DEFAULT_FORMATS,
    zero_shot_task: parity.ZeroShotTask | None = None,
    tensorrt: TensorRTOptions | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Exports, gates and writes `repository/name/`; raises ParityError (and writes nothing) on a failed gate."""
    formats = parse_formats(formats)
    check_name(name)
    repository.mkdir(parents=True, exist_ok=True)
    target = repository / name
    steps = _Steps(progress)
    with staged_directory(target, must_contain=MANIFEST_FILE, progress=progress) as staging:
        manifest = _Export(model, staging, zero_shot_task, steps).run(name, formats, tensorrt)
        with steps.step("verify manifest and checksums"):
            load_manifest(staging, verify=True)
    return ExportResult(target, manifest, time.perf_counter() - steps.started, steps.seconds)


class _Export:
    """One model's export into a staging directory: graphs, gate, tokenizer, engines, manifest."""

    def __init__(self, model: LoadedModel, staging: Path, task: parity.ZeroShotTask | None, steps: _Steps) -> None:
        self.model, self.staging, self.task, self.steps = model, staging, task, steps
        self.tokenizer_json = open_clip_tokenizer_json()
        tokenizer = ClipTokenizer.from_json(self.tokenizer_json, model.tokenizer)
        with steps.step("render probe set"):
            self.probe = probes.build_probe_set(model.preprocess, tokenizer, model.tokenizer)
        self.towers = {"image": model.image_tower, "text": model.text_tower}
        self.inputs = {"image": self.probe.pixels, "text": self.probe.token_ids}
        self.specs = {
            "image": graphs.image_spec(model.preprocess.image_size),
            "text": graphs.text_spec(model.tokenizer.context_length),
        }
        self.reference = {}
        for role, tower in self.towers.items():
            with steps.step(f"PyTorch reference ({role})"):
                self.reference[role] = parity.run_tower(tower, self.inputs[role])
        self.reference_top1 = None
        if task is not None:
            with steps.step("PyTorch reference (zero-shot task)"):
                self.reference_top1 = task.predictions(
                    lambda x: parity.run_tower(model.image_tower, x), lambda x: parity.run_tower(model.text_tower, x)
                )

    def run(self, name: str, formats: Sequence[str], tensorrt: TensorRTOptions | None) -> Manifest:
        artifacts: list[Artifact] = []
        checks: list[ParityCheck] = []
        for precision in ["fp32"] + [_VARIANTS[f] for f in formats if f in _VARIANTS]:
            checks += self._write_and_check(precision)
            for role, spec in self.specs.items():
                path = graph_file(role, precision)
                artifacts.append(_graph_artifact(self.staging, path, spec, precision, self.model.embed_dim))
        failures = [c for c in checks if not c.passed]
        if failures:
            raise parity.ParityError(failures)

        (self.staging / TOKENIZER_FILE).write_text(self.tokenizer_json)
        artifacts.append(_artifact(self.staging, TOKENIZER_FILE, "tokenizer", "tokenizer", None))
        engines: list[TensorRTBuild] = []
        if "tensorrt" in formats:
            engine_specs = [
                EngineSpec(role, self.staging / graph_file(role, "fp32"), spec.input_name, spec.sample_shape)
                for role, spec in self.specs.items()
            ]
            with self.steps.step("TensorRT engines"):
                build, plans = build_and_record(self.staging, engine_specs, tensorrt or TensorRTOptions())
            engines.append(build)
            artifacts.extend(plans)
        manifest = self._manifest(name, artifacts, engines, checks)
        (self.staging / MANIFEST_FILE).write_text(manifest.to_json())
        return manifest

    def _write_and_check(self, precision: str) -> list[ParityCheck]:
        files = {role: graph_file(role, precision) for role in self.towers}
        for role, tower in self.towers.items():
            path = self.staging / files[role]
            if precision == "fp32":
                with self.steps.step(f"export {files[role]}"):
                    graphs.export_tower(tower, self.inputs[role], path, self.specs[role])
            else:
                with self.steps.step(f"convert {files[role]}"):
                    _CONVERTERS[precision](self.staging / graph_file(role, "fp32"), path)
        sessions = {role: parity.session(self.staging / files[role], precision) for role in self.towers}
        top1 = None
        if self.task is not None and self.reference_top1 is not None:
            with self.steps.step(f"zero-shot agreement ({precision})"):
                predicted = self.task.predictions(
                    partial(parity.run_session, sessions["image"]), partial(parity.run_session, sessions["text"])
                )
            top1 = float(np.mean(predicted == self.reference_top1))
        checks = []
        for role, graph in sessions.items():
            with self.steps.step(f"parity {files[role]}"):
                check = parity.check_graph(
                    files[role], role, precision, graph, self.inputs[role], self.reference[role], top1_agreement=top1
                )
            self.steps.progress(
                f"  {files[role]}: min cosine {check.min_cosine:.7f}, max |diff| {check.max_abs_diff:.2e}"
                + (f", top-1 agreement {top1:.1%}" if top1 is not None else "")
                + ("" if check.passed else "  <-- FAILS")
            )
            checks.append(check)
        return checks

    def _manifest(
        self, name: str, artifacts: list[Artifact], engines: list[TensorRTBuild], checks: list[ParityCheck]
    ) -> Manifest:
        from export import __version__

        model = self.model
        return Manifest(
            name=name,
            source=_portable_source(model.source),
            embed_dim=model.embed_dim,
            preprocess=PreprocessInfo.model_validate(model.preprocess.to_dict()),
            tokenizer=TokenizerInfo(file=TOKENIZER_FILE, **vars(model.tokenizer)),
            logit_scale=model.logit_scale,
            logit_bias=model.logit_bias,
            activation=model.activation,
            artifacts=tuple(artifacts),
            tensorrt=tuple(engines),
            exporter=Exporter(
                clipserve=__version__,
                opset=graphs.OPSET,
                exported_at=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
                seconds=round(time.perf_counter() - self.steps.started, 1),
                libraries=_library_versions(),
            ),
            parity=ParityReport(
                probe_images=len(self.probe.pixels),
                probe_texts=len(self.probe.token_ids),
                top1_task=self.task.name if self.task is not None else None,
                checks=tuple(checks),
            ),
        )
