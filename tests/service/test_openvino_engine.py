"""CLIPSERVE_ENGINE=openvino on the committed demo model: f32 serves what ONNX Runtime serves, bf16 within its gate.

bf16 needs a CPU with AVX-512 BF16 or AMX. The branch this machine supports is tested for real (served within
the gate, or refused at startup); the refusal is also tested everywhere by faking the CPU plugin's capability
query, and the gate's own refusal by an engine made to drift.
"""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from models.demo.config import EXPORT_NAME, REPOSITORY_DIR
from models.manifest import load_manifest
from service.engines import openvino as ov_engines
from service.engines.base import EngineError
from service.engines.factory import build_engines
from service.settings import Settings
from tests.service.conftest import b64, running_app, shape_png

pytest.importorskip("openvino")

ROOT = Path(__file__).resolve().parents[2]
DEMO_DIR = REPOSITORY_DIR / EXPORT_NAME
LABELS = ["blue triangle", "red circle", "green square", "yellow hexagon", "purple star"]
SHAPES = [("triangle", "blue", (200, 150)), ("circle", "red", (64, 64)), ("square", "green", (317, 90))]
TEXTS = ["a photo of a red circle.", "a blue square", "東京タワー", "a " + "very " * 40 + "long caption"]


def _bf16_supported() -> bool:
    return "BF16" in ov_engines.cpu_capabilities(ov_engines.load_openvino().Core())


def _vectors(items: list) -> np.ndarray:
    return np.array([np.frombuffer(base64.b64decode(i), "<f4") if isinstance(i, str) else i for i in items])


async def _serve(**settings: object) -> tuple[str, np.ndarray, np.ndarray, list[list[tuple[str, float]]]]:
    """What one app answers: its engine, /embed image and text vectors, /classify (label, score) rankings."""
    images = [b64(shape_png(shape, colour, size)) for shape, colour, size in SHAPES]
    async with running_app(**settings) as (_, client):
        engine = (await client.get("/v1/models")).json()["data"][0]["engine"]
        embedded = await client.post("/embed", json={"images": images, "texts": TEXTS})
        classified = await client.post("/classify", json={"images": images, "labels": LABELS})
    assert embedded.status_code == classified.status_code == 200, (embedded.text, classified.text)
    rankings = [[(item["label"], item["score"]) for item in r["labels"]] for r in classified.json()["results"]]
    return engine, _vectors(embedded.json()["images"]), _vectors(embedded.json()["texts"]), rankings


# Both async tests compare with one ONNX Runtime app, in the module's event loop.
shared_loop = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def onnxruntime_answers():
    return await _serve(engine="onnxruntime")


@shared_loop
async def test_f32_serves_what_onnxruntime_serves(onnxruntime_answers):
    _, ort_images, ort_texts, ort_rankings = onnxruntime_answers
    engine, images, texts, rankings = await _serve(engine="openvino", openvino_precision="f32")
    assert engine == "openvino CPU fp32 image.onnx"
    np.testing.assert_allclose(images, ort_images, atol=1e-4)
    np.testing.assert_allclose(texts, ort_texts, atol=1e-4)
    for got, expected in zip(rankings, ort_rankings, strict=True):
        assert [label for label, _ in got] == [label for label, _ in expected]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=1e-4)


@shared_loop
async def test_bf16_is_served_within_its_gate_or_refused_on_a_cpu_without_it(onnxruntime_answers):
    if not _bf16_supported():
        with pytest.raises(EngineError, match="no bf16 support"):
            await _serve(engine="openvino", openvino_precision="bf16")
        return
    _, ort_images, ort_texts, ort_rankings = onnxruntime_answers
    engine, images, texts, rankings = await _serve(engine="openvino", openvino_precision="bf16")
    # /v1/models says what it computes in and what the gate measured.
    assert engine.startswith("openvino CPU bf16 image.onnx (parity vs onnxruntime fp32: min cosine 0.99")
    assert "top-1 agreement" in engine
    for got, expected in ((images, ort_images), (texts, ort_texts)):
        assert ((got * expected).sum(axis=1) >= ov_engines.MIN_COSINE).all()
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert [r[0][0] for r in rankings] == [r[0][0] for r in ort_rankings]


def test_bf16_is_refused_with_a_clear_message_where_the_cpu_lacks_it(monkeypatch):
    """Faked capability query: runs on any CPU, including those (like most CI runners') where this is the real case."""
    monkeypatch.setattr(ov_engines, "cpu_capabilities", lambda core: ["FP32", "INT8"])
    with pytest.raises(EngineError, match=r"bf16, but this CPU has no bf16 support .* reports FP32, INT8.*=f32"):
        build_engines(Settings(engine="openvino", openvino_precision="bf16"), load_manifest(DEMO_DIR), DEMO_DIR)


class _Drifting:
    """An engine whose embeddings drift from the graph's by about 5 % of their norm, renormalised."""

    def __init__(self, engine: ov_engines.OpenVinoEngine) -> None:
        self.engine, self.precision, self.description = engine, "bf16", engine.description
        self.rng = np.random.default_rng(0)

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        out = self.engine(inputs)
        out = out + 0.05 * self.rng.standard_normal(out.shape).astype(np.float32) / np.sqrt(out.shape[1])
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_a_drifting_engine_fails_the_gate_with_a_clear_message():
    # The gate itself, on f32 engines made to drift: the same on every CPU, bf16 or not.
    manifest = load_manifest(DEMO_DIR)
    paths = {role: DEMO_DIR / f"{role}.onnx" for role in ("image", "text")}
    image, text = (ov_engines.OpenVinoEngine(paths[role], role, precision="f32") for role in ("image", "text"))
    with pytest.raises(EngineError, match=r"fails its parity gate against onnxruntime fp32 .* image min cosine 0\.99"):
        ov_engines.check_parity(_Drifting(image), text, paths, manifest, DEMO_DIR)  # type: ignore[arg-type]
    result = ov_engines.check_parity(image, text, paths, manifest, DEMO_DIR)  # undisturbed f32 passes, near-exactly
    assert result.min_cosine > 0.99999 and result.top1_agreement == 1.0


def test_openvino_needs_fp32_graphs_and_names_its_extra_when_missing(monkeypatch):
    manifest = load_manifest(DEMO_DIR)
    with pytest.raises(EngineError, match=r"CLIPSERVE_PRECISION=int8; unset it .* CLIPSERVE_OPENVINO_PRECISION"):
        build_engines(Settings(engine="openvino", precision="int8"), manifest, DEMO_DIR)
    monkeypatch.setitem(sys.modules, "openvino", None)  # importing it now raises ImportError, as without the extra
    with pytest.raises(EngineError, match=r"pip install 'clipserve\[openvino\]'"):
        build_engines(Settings(engine="openvino"), manifest, DEMO_DIR)


def test_the_openvino_engine_imports_without_torch():
    code = "import sys; import service.engines.openvino; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
