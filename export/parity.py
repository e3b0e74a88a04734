"""The parity gate: every exported graph against the PyTorch tower it came from, before anything is written.

For each graph, the probe set (export/probes.py) goes through ONNX Runtime at several batch sizes (1, 7 and
64 rows, so the dynamic batch axis is exercised at its edges and in between) and is compared row by row with
the PyTorch embeddings of the same rows: the smallest cosine similarity and the largest absolute difference.
Where a labelled zero-shot task is available (the demo model's), the image and text graphs of one precision
are also scored together and their top-1 predictions compared with PyTorch's.

Thresholds per precision (issue "Export"): fp32 cosine >= 0.99999 and max |diff| <= 1e-4; fp16 cosine >=
0.999; int8 cosine >= 0.99 and top-1 agreement >= 98 %. A graph below them fails the export.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from models.manifest import ParityCheck
from models.scoring import cosines, row_cosines
from models.templates import ensemble

BATCH_SIZES = (1, 7, 64)
Encoder = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Gate:
    min_cosine: float
    max_abs_diff: float | None = None
    min_top1_agreement: float | None = None


GATES: dict[str, Gate] = {
    "fp32": Gate(min_cosine=0.99999, max_abs_diff=1e-4),
    "fp16": Gate(min_cosine=0.999),
    "int8": Gate(min_cosine=0.99, min_top1_agreement=0.98),
}


class ParityError(RuntimeError):
    """An exported graph disagrees with the PyTorch model by more than its precision allows."""

    def __init__(self, failures: Sequence[ParityCheck]) -> None:
        self.failures = tuple(failures)
        super().__init__("parity gate failed, nothing was written:\n" + "\n".join(map(describe_failure, failures)))


def describe_failure(check: ParityCheck) -> str:
    reasons = []
    if check.min_cosine < check.required_min_cosine:
        reasons.append(
            f"min cosine {check.min_cosine:.7f} < {check.required_min_cosine} "
            f"(short by {check.required_min_cosine - check.min_cosine:.2e})"
        )
    if check.required_max_abs_diff is not None and check.max_abs_diff > check.required_max_abs_diff:
        reasons.append(
            f"max |diff| {check.max_abs_diff:.2e} > {check.required_max_abs_diff:.0e} "
            f"({check.max_abs_diff / check.required_max_abs_diff:.1f}x the limit)"
        )
    if check.required_top1_agreement is not None and (check.top1_agreement or 0.0) < check.required_top1_agreement:
        reasons.append(f"top-1 agreement {check.top1_agreement:.1%} < {check.required_top1_agreement:.0%}")
    return f"  {check.artifact} ({check.precision}): " + "; ".join(reasons or ["failed"])


# ONNX Runtime 1.32's CPU layout transformer (NCHWc) segfaults while optimising our fp16 text graph; it
# only re-lays-out convolutions, so leaving it off for fp16 graphs costs nothing the fp16 variant is for (GPUs).
CPU_FP16_DISABLED_OPTIMIZERS = ("NchwcTransformer",)


def session(path: Path, precision: str = "fp32") -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # fp16 graphs make the CPU provider warn about every inserted cast
    disabled = list(CPU_FP16_DISABLED_OPTIMIZERS) if precision == "fp16" else []
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


def run_session(graph: ort.InferenceSession, inputs: np.ndarray, batch: int = 64) -> np.ndarray:
    name = graph.get_inputs()[0].name
    return np.concatenate([graph.run(None, {name: inputs[i : i + batch]})[0] for i in range(0, len(inputs), batch)])


@torch.no_grad()
def run_tower(tower: torch.nn.Module, inputs: np.ndarray, batch: int = 64) -> np.ndarray:
    chunks = [tower(torch.from_numpy(inputs[i : i + batch])).float().numpy() for i in range(0, len(inputs), batch)]
    return np.concatenate(chunks)


@dataclass(frozen=True)
class ZeroShotTask:
    """Labelled images and per-label prompt token ids: top-1 agreement between PyTorch and a variant."""

    name: str
    pixels: np.ndarray  # [N, 3, S, S]
    prompt_ids: np.ndarray  # [C * T, L], T templates per label, label-major
    labels: int

    def predictions(self, encode_images: Encoder, encode_texts: Encoder) -> np.ndarray:
        classes = ensemble(encode_texts(self.prompt_ids), self.labels)
        return cosines(encode_images(self.pixels), classes).argmax(axis=1)  # the scoring's top-1, either activation


def check_graph(
    artifact: str,
    role: str,
    precision: str,
    graph: ort.InferenceSession,
    probe: np.ndarray,
    reference: np.ndarray,
    *,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    top1_agreement: float | None = None,
) -> ParityCheck:
    gate = GATES[precision]
    cosines, diffs = [], []
    for batch in batch_sizes:
        # The first `batch` rows in one call: the graph must give each row the same answer at any batch size.
        out = graph.run(None, {graph.get_inputs()[0].name: probe[:batch]})[0]
        # Non-finite values anywhere fail the check outright: NaN would slip through min() and max().
        finite = np.isfinite(out).all() and np.isfinite(reference[:batch]).all()
        if out.shape != reference[:batch].shape or not finite:
            cosines.append(-1.0)
            diffs.append(float("inf"))
            continue
        cosines.append(float(row_cosines(out, reference[:batch]).min()))
        diffs.append(float(np.abs(out.astype(np.float64) - reference[:batch]).max()))
    min_cosine, max_abs_diff = min(cosines), max(diffs)
    passed = min_cosine >= gate.min_cosine
    if gate.max_abs_diff is not None:
        passed = passed and max_abs_diff <= gate.max_abs_diff
    if gate.min_top1_agreement is not None and top1_agreement is not None:
        passed = passed and top1_agreement >= gate.min_top1_agreement
    return ParityCheck(
        artifact=artifact,
        role=role,  # type: ignore[arg-type]
        precision=precision,  # type: ignore[arg-type]
        batch_sizes=tuple(batch_sizes),
        min_cosine=min_cosine,
        max_abs_diff=max_abs_diff,
        top1_agreement=top1_agreement,
        required_min_cosine=gate.min_cosine,
        required_max_abs_diff=gate.max_abs_diff,
        required_top1_agreement=gate.min_top1_agreement if top1_agreement is not None else None,
        passed=passed,
    )
