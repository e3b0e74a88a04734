"""/embed, /v1/embeddings (with the official OpenAI client over real HTTP), /v1/models, probes."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from tests.service.conftest import b64, live_server, shape_png

# The async tests only read the app, so they share one demo app, in the module's event loop.
shared_loop = pytest.mark.asyncio(loop_scope="module")


def _vectors(items) -> np.ndarray:
    return np.array([np.frombuffer(base64.b64decode(i), "<f4") if isinstance(i, str) else i for i in items])


@shared_loop
async def test_embed_images_and_texts(shared_demo):
    _, client = shared_demo
    body = {"images": [b64(shape_png()), b64(shape_png("circle", "red"))], "texts": ["a blue triangle", "red circle"]}
    response = await client.post("/embed", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["model"] == "clipserve-demo" and data["dim"] == 64
    images, texts = _vectors(data["images"]), _vectors(data["texts"])
    assert images.shape == texts.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1, atol=1e-5)
    similarity = images @ texts.T
    assert similarity[0, 0] > similarity[0, 1] and similarity[1, 1] > similarity[1, 0]

    as_base64 = await client.post("/embed", json={**body, "encoding_format": "base64"})
    np.testing.assert_array_equal(_vectors(as_base64.json()["images"]), images.astype(np.float32))


@shared_loop
async def test_embed_with_templates_gives_the_classify_label_vectors(shared_demo):
    _, client = shared_demo
    png = shape_png()
    labels = ["blue triangle", "red circle"]
    embedded = await client.post("/embed", json={"images": [b64(png)], "texts": labels, "templates": "imagenet"})
    classified = await client.post("/classify", json={"images": [b64(png)], "labels": labels, "templates": "imagenet"})
    data = embedded.json()
    cosines = _vectors(data["images"]) @ _vectors(data["texts"]).T
    scores = {item["label"]: item["score"] for item in classified.json()["results"][0]["labels"]}
    for i, label in enumerate(labels):
        assert scores[label] == pytest.approx(float(cosines[0, i]), abs=1e-5)


@shared_loop
async def test_embed_needs_something(shared_demo):
    _, client = shared_demo
    response = await client.post("/embed", json={})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_input"


@shared_loop
async def test_models_and_probes(shared_demo):
    _, client = shared_demo
    models = (await client.get("/v1/models")).json()
    (card,) = models["data"]
    assert card["id"] == "clipserve-demo" and card["embed_dim"] == 64 and card["activation"] == "softmax"
    assert "onnxruntime" in card["engine"] and len(card["content_hash"]) == 64
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    metrics = (await client.get("/metrics")).text
    for name in (
        "clipserve_request_seconds",
        "clipserve_queue_wait_seconds",
        "clipserve_preprocess_seconds",
        "clipserve_engine_seconds",
        "clipserve_batch_size",
        "clipserve_queue_depth",
        "clipserve_label_cache_total",
        "clipserve_redis_errors_total",
        "clipserve_engine_info",
    ):
        assert name in metrics, name


@shared_loop
async def test_over_long_texts_are_refused(shared_demo):
    _, client = shared_demo
    response = await client.post("/embed", json={"texts": ["ok", "x" * 2001]})
    assert response.status_code == 422 and response.json()["error"]["param"] == "texts[1]"
    response = await client.post("/v1/embeddings", json={"input": "x" * 2001})
    assert response.status_code == 422 and response.json()["error"]["param"] == "input[0]"


def test_openai_client_embeddings_over_http():
    openai = pytest.importorskip("openai")
    png = shape_png()
    with live_server() as (_, url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        texts = client.embeddings.create(model="clipserve-demo", input=["a blue triangle", "a red circle"])
        assert [d.index for d in texts.data] == [0, 1] and texts.model == "clipserve-demo"
        assert texts.usage.prompt_tokens > 0
        vectors = np.array([d.embedding for d in texts.data])
        assert vectors.shape == (2, 64)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)

        mixed = client.embeddings.create(
            model="clipserve-demo", input=[f"data:image/png;base64,{b64(png)}", "a blue triangle"]
        )
        image, text = (np.array(d.embedding) for d in mixed.data)
        np.testing.assert_allclose(text, vectors[0], atol=1e-6)
        assert image @ vectors[0] > image @ vectors[1]  # the triangle image is nearer its caption

        floats = client.embeddings.create(model="clipserve-demo", input="a red circle", encoding_format="float")
        np.testing.assert_allclose(floats.data[0].embedding, vectors[1], atol=1e-6)

        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="gpt-4", input="x")
