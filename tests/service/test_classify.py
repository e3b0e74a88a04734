"""/classify on the built-in demo model: real ONNX Runtime engines, real batcher, real label cache."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from models.manifest import load_manifest
from models.preprocess import ImageTransform
from models.templates import PRESETS, apply_templates
from models.tokenizer import ClipTokenizer
from service.model import model_directory
from service.settings import Settings
from tests.service.conftest import b64, engine_calls, live_server, running_app, shape_png

# The demo app is shared by the tests that only read it (`shared_demo`); the rest start their own.
pytestmark = pytest.mark.asyncio(loop_scope="module")

LABELS = ["red circle", "blue triangle", "green square", "yellow hexagon"]


def _direct_probabilities(png: bytes, labels: list[str], templates: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The reference: the exported graphs run directly with ONNX Runtime, the ensemble and softmax in numpy."""
    import io

    directory = model_directory(Settings())
    manifest = load_manifest(directory)
    image_graph = ort.InferenceSession(str(directory / "image.onnx"), providers=["CPUExecutionProvider"])
    text_graph = ort.InferenceSession(str(directory / "text.onnx"), providers=["CPUExecutionProvider"])
    pixels = ImageTransform(manifest.preprocess.config())(Image.open(io.BytesIO(png)))[None]
    image = image_graph.run(None, {"pixels": pixels})[0][0]
    tokenizer = ClipTokenizer.from_file(directory / "tokenizer.json", manifest.tokenizer.spec())
    rows = []
    for label in labels:
        texts = text_graph.run(None, {"token_ids": tokenizer(apply_templates(templates, label))})[0]
        mean = texts.mean(axis=0)
        rows.append(mean / np.linalg.norm(mean))
    cosines = np.stack(rows) @ image
    logits = manifest.logit_scale * cosines.astype(np.float64)
    probabilities = np.exp(logits - logits.max())
    return probabilities / probabilities.sum(), cosines


@pytest.mark.parametrize("templates", ["imagenet", "bare", ["a drawing of a {}.", "{} on grey"]])
async def test_probabilities_equal_a_direct_computation(shared_demo, templates):
    _, client = shared_demo
    png = shape_png("triangle", "blue")
    response = await client.post("/classify", json={"images": [b64(png)], "labels": LABELS, "templates": templates})
    assert response.status_code == 200, response.text
    body = response.json()
    resolved = PRESETS[templates] if isinstance(templates, str) else tuple(templates)
    expected_probabilities, expected_cosines = _direct_probabilities(png, LABELS, resolved)
    got = {item["label"]: item for item in body["results"][0]["labels"]}
    for i, label in enumerate(LABELS):
        assert got[label]["probability"] == pytest.approx(expected_probabilities[i], abs=1e-5)
        assert got[label]["score"] == pytest.approx(float(expected_cosines[i]), abs=1e-5)
    probabilities = [item["probability"] for item in body["results"][0]["labels"]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-6)
    assert body["model"] == "clipserve-demo"
    assert set(body["timing"]) == {"total_ms", "images_ms", "labels_ms", "similarity_ms"}


async def test_the_demo_model_gets_easy_images_right(shared_demo):
    _, client = shared_demo
    images = [b64(shape_png(shape, colour)) for shape, colour in [("triangle", "blue"), ("circle", "red")]]
    response = await client.post("/classify", json={"images": images, "labels": LABELS, "top_k": 2})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["labels"][0]["label"] for r in results] == ["blue triangle", "red circle"]
    assert all(len(r["labels"]) == 2 for r in results)


@pytest.mark.parametrize(
    "labels_fields",
    [
        {"labels": ["red circle", "blue triangle", "green square"]},
        {"labels": json.dumps(["red circle", "blue triangle", "green square"])},
        {"labels": "red circle, blue triangle,green square"},
    ],
    ids=["repeated", "json-list", "comma-separated"],
)
async def test_multipart_upload(shared_demo, labels_fields):
    _, client = shared_demo
    files = [("image", ("shape.png", shape_png("triangle", "blue"), "image/png"))]
    response = await client.post("/classify", files=files, data={**labels_fields, "top_k": "3"})
    assert response.status_code == 200, response.text
    ranked = [item["label"] for item in response.json()["results"][0]["labels"]]
    assert sorted(ranked) == ["blue triangle", "green square", "red circle"]
    assert ranked[0] == "blue triangle"


async def test_multipart_and_json_agree(shared_demo):
    _, client = shared_demo
    png = shape_png("square", "green")
    multipart = await client.post(
        "/classify", files=[("image", ("a.png", png, "image/png"))], data={"labels": json.dumps(LABELS)}
    )
    plain = await client.post("/classify", json={"images": [b64(png)], "labels": LABELS})
    assert multipart.json()["results"] == plain.json()["results"]


async def test_concurrent_requests_share_engine_calls():
    """32 concurrent single-image requests over real HTTP are served in far fewer image-engine calls."""
    import httpx

    with live_server(max_batch_size=32, max_wait_ms=200) as (app, url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            labels_a, labels_b = LABELS, ["circle", "triangle", "square"]
            await client.post("/classify", json={"images": [b64(shape_png())], "labels": labels_a})  # warm labels
            await client.post("/classify", json={"images": [b64(shape_png())], "labels": labels_b})
            calls_before = engine_calls(app, "image")
            pngs = [shape_png(s, c) for s in ("triangle", "circle", "square", "hexagon") for c in ("red", "blue")] * 4
            responses = await asyncio.gather(
                *(
                    client.post("/classify", json={"images": [b64(png)], "labels": labels_a if i % 2 else labels_b})
                    for i, png in enumerate(pngs)
                )
            )
            assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
            calls = engine_calls(app, "image") - calls_before
            metrics = app.state.metrics
            histogram = {
                bucket: metrics.value("clipserve_batch_size_bucket", {"engine": "image", "le": bucket})
                for bucket in ("1.0", "2.0", "4.0", "8.0", "16.0", "32.0")
            }
            print(f"32 requests -> {calls} image-engine calls; cumulative batch-size histogram: {histogram}")
            assert calls <= 8


async def test_top_k_and_duplicate_labels(shared_demo):
    _, client = shared_demo
    response = await client.post(
        "/classify", json={"images": [b64(shape_png())], "labels": ["blue triangle", "blue triangle", "red circle"]}
    )
    assert response.status_code == 200
    labels = response.json()["results"][0]["labels"]
    assert len(labels) == 3 and labels[0]["probability"] == pytest.approx(labels[1]["probability"])


async def test_int8_precision_serves_the_int8_graphs():
    async with running_app(precision="int8") as (app, client):
        response = await client.post("/classify", json={"images": [b64(shape_png())], "labels": LABELS})
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["labels"][0]["label"] == "blue triangle"
        assert "int8" in app.state.pipeline.engines.image.description
