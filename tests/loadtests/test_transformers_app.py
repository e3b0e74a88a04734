"""The hand-rolled transformers baseline of `make bench` answers clipserve's /classify body: every label, ranked, with
probabilities that sum to 1, tokenised exactly as clipserve tokenises (a tiny random-init CLIP keeps it fast)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import pytest
from PIL import Image

from tests.tiny_models import tiny_hf_clip_config

pytest.importorskip("transformers")
pytest.importorskip("torch")

from fastapi.testclient import TestClient

from loadtests.bench.transformers_app import TOKENIZER_FILE, build_tokenizer, create_app
from models.tokenizer import ClipTokenizer

LABELS = ["red circle", "blue triangle", "green square", "yellow hexagon", "purple star"]


def jpeg(colour: str, size: tuple[int, int] = (64, 48)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(tiny_hf_clip_config())) as client:  # runs the startup: model built, then ready
        yield client


def test_ready_once_the_model_is_built(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["status"] == "ready"


def test_classify_ranks_every_label_per_image(client: TestClient) -> None:
    body = {"images": [jpeg("blue"), jpeg("red", (640, 480))], "labels": LABELS, "templates": ["a photo of a {}."]}
    response = client.post("/classify", json=body)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 2
    for result in results:
        probabilities = [entry["probability"] for entry in result["labels"]]
        assert sorted(entry["label"] for entry in result["labels"]) == sorted(LABELS)
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
        assert probabilities == sorted(probabilities, reverse=True)


def test_templates_are_optional_and_presets_are_refused(client: TestClient) -> None:
    body = {"images": [jpeg("green")], "labels": LABELS[:2]}
    assert client.post("/classify", json=body).status_code == 200
    assert client.post("/classify", json={**body, "templates": "this is a {}"}).status_code == 200
    assert client.post("/classify", json={**body, "templates": "simple"}).status_code == 422


def test_an_undecodable_image_is_a_400(client: TestClient) -> None:
    body = {"images": [base64.b64encode(b"not an image").decode()], "labels": LABELS}
    assert client.post("/classify", json=body).status_code == 400


def test_tokenizer_gives_clipserves_ids() -> None:
    texts = ["a photo of a Blue   Triangle.", "A café's hot-dog, 3 of them!", "golden retriever"]
    encoded = build_tokenizer()(texts, padding="max_length", max_length=77)
    expected = ClipTokenizer.from_file(TOKENIZER_FILE)(texts, context_length=77)
    for ids, mask, reference in zip(encoded["input_ids"], encoded["attention_mask"], expected, strict=True):
        assert [i for i, m in zip(ids, mask, strict=True) if m] == [i for i in reference.tolist() if i]
