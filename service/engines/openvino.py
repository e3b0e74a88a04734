"""OpenVINO engine: the manifest's fp32 ONNX graph compiled for the CPU, in f32 or bf16.

fp32 ONNX Runtime already runs at this kind of CPU's fp32 matmul ceiling, so more speed on a CPU has to come
from lower precision: OpenVINO with ``INFERENCE_PRECISION_HINT=bf16`` on a CPU with AVX-512 BF16 or AMX runs
the same graph about twice as fast, closer to fp32 than dynamic int8 is. The precision is an explicit setting
(`CLIPSERVE_OPENVINO_PRECISION`), never OpenVINO's own default, which is bf16 on such CPUs and f32 elsewhere:
answers must not change because a pod landed on a newer node.

bf16 comes with its own parity gate, run here at startup (`check_parity`): a fixed probe set of rendered images
and templated prompts through the bf16 engines and through an fp32 reference on the same graphs (ONNX Runtime
when installed, else OpenVINO f32), and for the demo model top-1 agreement on its zero-shot task. Below the gate
the service refuses to start. The export gate (export/parity.py) cannot be reused: it imports torch, and the
service never does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image

from models.demo import evaluate, shapes
from models.demo.config import EXPORT_NAME as DEMO_NAME
from models.manifest import Manifest
from models.preprocess import ImageTransform
from models.scoring import cosines, row_cosines
from models.templates import IMAGENET_80, PRESETS, apply_templates, ensemble
from models.tokenizer import ClipTokenizer
from service.engines.base import EngineError

log = logging.getLogger("clipserve.engines")

# Settings value -> (OpenVINO's INFERENCE_PRECISION_HINT, the name the rest of clipserve uses).
PRECISIONS = {"f32": ("f32", "fp32"), "bf16": ("bf16", "bf16")}

# The bf16 gate. Cosine as export's fp16 gate: bf16 keeps fewer mantissa bits than fp16 but accumulates in fp32;
# measured minimums are ~0.9999 (demo) and ~0.99995 (ViT-B-32), so 0.999 leaves room for other CPUs' kernels.
MIN_COSINE = 0.999
# Top-1 agreement on the demo task, as export's int8 gate: 98 % of 256 images. Not 100 %: a near-tie between two
# labels flips on rounding alone. Measured: 255/256 agree; the one flip is the set's closest call in fp32 (top-1
# ahead of the bf16 answer by 0.0011 cosine, where bf16 moves scores by up to 0.008).
MIN_TOP1_AGREEMENT = 0.98
PROBE_IMAGES = 24
PROBE_SEED = 20_261_201  # distinct from export's probe and task seeds
DEMO_TASK_IMAGES = 256
CPU = "CPUExecutionProvider"  # the reference runs where the candidate does, so the comparison is of precision only
_PROBE_LABELS = (
    "golden retriever",
    "invoice",
    "a red circle",
    "tabby cat",
    "crème brûlée",
    "東京タワー",
    "🚲 parked outside",
    "green hexagon",
    "a very long label that keeps going with many words so that the prompt overflows the shortest context "
    "windows any model here uses and must be truncated with an end token",
    "",
)


def load_openvino() -> ModuleType:
    """The `openvino` module, imported only when asked for, or an EngineError saying how to get it."""
    try:
        import openvino
    except ImportError as error:
        raise EngineError(
            f"OpenVINO is not installed here (import openvino failed: {error}); CLIPSERVE_ENGINE=openvino needs "
            "pip install 'clipserve[openvino]'"
        ) from error
    return openvino


def cpu_capabilities(core: Any) -> list[str]:
    """What the CPU plugin can compute in ("FP32", "BF16", "INT8", ...); a function of its own so tests can fake it."""
    return [str(item) for item in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def new_core(precision: str) -> Any:
    """An `openvino.Core`, after checking that this CPU computes in `precision` ("f32" or "bf16")."""
    if precision not in PRECISIONS:
        raise EngineError(f"CLIPSERVE_OPENVINO_PRECISION={precision!r}; expected f32 or bf16")
    core = load_openvino().Core()
    if precision == "bf16":
        capabilities = cpu_capabilities(core)
        # Without native bf16 OpenVINO silently computes in f32 instead: what the setting asks for would not happen.
        if "BF16" not in capabilities:
            raise EngineError(
                "CLIPSERVE_OPENVINO_PRECISION=bf16, but this CPU has no bf16 support (AVX-512 BF16 or AMX); "
                f"OpenVINO reports {', '.join(capabilities) or 'none'}. Use CLIPSERVE_OPENVINO_PRECISION=f32"
            )
    return core


class OpenVinoEngine:
    """One fp32 ONNX graph compiled by OpenVINO for the CPU; float32 [B, D] unit rows out."""

    def __init__(self, path: Path, role: str, *, precision: str, core: Any | None = None, threads: int = 0) -> None:
        path = Path(path)
        if not path.is_file():
            raise EngineError(f"ONNX graph {path} does not exist")
        core = core if core is not None else new_core(precision)
        hint, self.precision = PRECISIONS[precision]
        self.role = role
        self.max_batch_size: int | None = None  # the exported batch axis is dynamic and OpenVINO keeps it so
        # LATENCY: one stream using every thread per call. The batcher makes one call at a time, so THROUGHPUT's
        # parallel streams would sit idle and split the threads (measured on ViT-B-32 in bf16: 21 / 23 images/s at
        # batch 1 / 16 against LATENCY's 36 / 40).
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            self._compiled: Any = core.compile_model(str(path), "CPU", config)
        except Exception as error:  # OpenVINO raises plain RuntimeError for a bad or unsupported graph
            raise EngineError(f"OpenVINO cannot compile {path}: {error}") from error
        self._request: Any = self._compiled.create_infer_request()
        element = self._compiled.input(0).get_element_type().to_dtype()
        self._input_dtype = np.dtype(element)
        self.description = f"openvino CPU {self.precision} {path.name}"
        actual = self._compiled.get_property("INFERENCE_PRECISION_HINT")
        if actual != getattr(load_openvino().Type, hint):  # a hint, so check that the plugin took it
            raise EngineError(f"{self.description}: OpenVINO compiled for {actual}, not the {hint} asked for")

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        if self._request is None:
            raise EngineError(f"{self.description} is closed")
        feed = np.ascontiguousarray(inputs, dtype=self._input_dtype)
        output = np.array(self._request.infer([feed])[0], dtype=np.float32)  # a copy: the request reuses its buffer
        if self.precision != "fp32":
            # The graph's own L2 normalisation ran in bf16, a few 1e-3 off unit length; the protocol promises unit rows.
            output /= np.maximum(np.linalg.norm(output, axis=1, keepdims=True), 1e-12)
        return output

    def close(self) -> None:
        self._request = None
        self._compiled = None


# ---------------------------------------------------------------------------------------------- the parity gate


@dataclass(frozen=True)
class ParityResult:
    reference: str  # what the candidate was compared with
    image_min_cosine: float
    text_min_cosine: float
    top1_agreement: float | None  # None when the model has no labelled task (every model but the demo)

    @property
    def min_cosine(self) -> float:
        return min(self.image_min_cosine, self.text_min_cosine)

    def failures(self) -> list[str]:
        found = [
            f"{role} min cosine {value:.6f} < {MIN_COSINE}"
            for role, value in (("image", self.image_min_cosine), ("text", self.text_min_cosine))
            if not value >= MIN_COSINE  # NaN fails too
        ]
        if self.top1_agreement is not None and not self.top1_agreement >= MIN_TOP1_AGREEMENT:
            found.append(f"demo task top-1 agreement {self.top1_agreement:.1%} < {MIN_TOP1_AGREEMENT:.0%}")
        return found

    def summary(self) -> str:
        agreement = "" if self.top1_agreement is None else f", top-1 agreement {self.top1_agreement:.1%}"
        return f"parity vs {self.reference}: min cosine {self.min_cosine:.6f}{agreement}"


@dataclass(frozen=True)
class Probes:
    pixels: np.ndarray  # [N, 3, S, S] through the model's preprocessing
    token_ids: np.ndarray  # [M, L]
    task_pixels: np.ndarray | None  # the demo task's images, or None
    task_prompt_ids: np.ndarray | None  # its labels x the photo template
    task_labels: int


def build_probes(manifest: Manifest, model_dir: Path) -> Probes:
    """Seeded rendered scenes plus extremes, templated prompts (long and non-ASCII), and the demo task if it applies."""
    rng = np.random.default_rng(PROBE_SEED)
    images = [
        Image.new("RGB", (97, 61), (0, 0, 0)),
        Image.new("RGB", (300, 300), (255, 255, 255)),
        Image.fromarray(rng.integers(0, 256, (181, 243, 3), dtype=np.uint8), "RGB"),
    ]
    while len(images) < PROBE_IMAGES:
        composition = shapes.random_composition(rng, shapes.ALL_COMPOSITIONS)
        images.append(shapes.render(rng, *composition, min_side=24, max_side=640).image)
    pixels = ImageTransform(manifest.preprocess.config()).batch(images)
    tokenizer = ClipTokenizer.from_file(Path(model_dir) / manifest.tokenizer.file, manifest.tokenizer.spec())
    texts = [IMAGENET_80[(7 * i) % len(IMAGENET_80)].format(label) for i, label in enumerate(_PROBE_LABELS * 2)]
    token_ids = tokenizer(texts)
    if manifest.name != DEMO_NAME:
        return Probes(pixels, token_ids, None, None, 0)
    half = DEMO_TASK_IMAGES // 2
    seen, held_out = evaluate.TASKS[0], evaluate.TASKS[1]
    task_pixels = np.concatenate([evaluate.render_set(task, half, PROBE_SEED)[0] for task in (seen, held_out)])
    prompts = [text for label in evaluate.COMPOSITION_LABELS for text in apply_templates(PRESETS["photo"], label)]
    return Probes(pixels, token_ids, task_pixels, tokenizer(prompts), len(evaluate.COMPOSITION_LABELS))


Encoder = Callable[[np.ndarray], np.ndarray]


def _batched(encode: Encoder, inputs: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate(
        [np.asarray(encode(inputs[i : i + batch]), dtype=np.float32) for i in range(0, len(inputs), batch)]
    )


def compare(
    candidate: tuple[Encoder, Encoder], reference: tuple[Encoder, Encoder], probes: Probes, name: str
) -> ParityResult:
    """Candidate vs reference (image, text) encoders on `probes`, at batch 1 and a full batch (the dynamic axis)."""

    def least_cosine(candidate_encode: Encoder, reference_encode: Encoder, inputs: np.ndarray) -> float:
        return min(
            float(row_cosines(_batched(candidate_encode, inputs, b), _batched(reference_encode, inputs, b)).min())
            for b in (1, len(inputs))
        )

    image_min = least_cosine(candidate[0], reference[0], probes.pixels)
    text_min = least_cosine(candidate[1], reference[1], probes.token_ids)
    agreement = None
    task_pixels, prompt_ids = probes.task_pixels, probes.task_prompt_ids
    if task_pixels is not None and prompt_ids is not None:

        def top1(image: Encoder, text: Encoder) -> np.ndarray:
            classes = ensemble(_batched(text, prompt_ids, 64), probes.task_labels)
            return cosines(_batched(image, task_pixels, 16), classes).argmax(axis=1)

        agreement = float((top1(*candidate) == top1(*reference)).mean())
    return ParityResult(name, image_min, text_min, agreement)


def reference_engines(paths: dict[str, Path], threads: int) -> tuple[str, list[Any]]:
    """fp32 engines on the same graphs: ONNX Runtime (which export's gate checked against PyTorch) if installed."""
    try:
        from service.engines.onnxruntime import OnnxRuntimeEngine
    except ImportError:
        core = new_core("f32")
        return "openvino f32", [
            OpenVinoEngine(paths[role], role, precision="f32", core=core, threads=threads) for role in ("image", "text")
        ]
    return "onnxruntime fp32", [
        OnnxRuntimeEngine(paths[role], role, precision="fp32", providers=[CPU], intra_op_threads=threads)
        for role in ("image", "text")
    ]


def check_parity(
    image: OpenVinoEngine,
    text: OpenVinoEngine,
    paths: dict[str, Path],
    manifest: Manifest,
    model_dir: Path,
    threads: int = 0,
) -> ParityResult:
    """The bf16 gate: EngineError below it; on success the result is appended to both engines' descriptions."""
    probes = build_probes(manifest, model_dir)
    name, [ref_image, ref_text] = reference_engines(paths, threads)
    try:
        result = compare((image, text), (ref_image, ref_text), probes, name)
    finally:
        ref_image.close()
        ref_text.close()
    failures = result.failures()
    if failures:
        raise EngineError(
            f"OpenVINO {image.precision} fails its parity gate against {name} on {manifest.name}: "
            f"{'; '.join(failures)}. Serve CLIPSERVE_OPENVINO_PRECISION=f32 instead"
        )
    log.info(
        "openvino %s %s (image %.6f, text %.6f)",
        image.precision,
        result.summary(),
        result.image_min_cosine,
        result.text_min_cosine,
    )
    for engine in (image, text):
        engine.description += f" ({result.summary()})"
    return result
