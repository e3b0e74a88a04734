"""Every bad input gets a 4xx with the one error shape, never a 500, and the server keeps serving."""

from __future__ import annotations

import asyncio
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

from service.engines.onnxruntime import OnnxRuntimeEngine
from tests.service.conftest import b64, running_app, shape_png, wait_until

# Tests that only read the app share one (`shared_demo`); tests that change settings or count requests start
# their own with `running_app`, in the same module-scoped event loop.
pytestmark = pytest.mark.asyncio(loop_scope="module")

LABELS = ["red circle", "blue triangle"]


def _assert_error(response, status: int, code: str, param: str | None = "any") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "param", "request_id"}
    assert body["error"]["request_id"] == response.headers["x-request-id"]  # the one the log line names too
    assert body["error"]["code"] == code
    assert "Traceback" not in response.text
    if param != "any":
        assert body["error"]["param"] == param
    return body["error"]


def _image_bytes(fmt: str, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, fmt)
    return buffer.getvalue()


async def _still_serving(client) -> None:
    response = await client.post("/classify", json={"images": [b64(shape_png())], "labels": LABELS})
    assert response.status_code == 200, response.text


CASES = [
    (
        "undecodable image",
        {"images": [b64(b"this is not an image")], "labels": LABELS},
        422,
        "invalid_input",
        "images[0]",
    ),
    ("truncated PNG", {"images": [b64(shape_png()[:200])], "labels": LABELS}, 422, "invalid_input", "images[0]"),
    ("bad base64", {"images": ["@@@not base64@@@"], "labels": LABELS}, 422, "invalid_input", "images[0]"),
    ("empty image", {"images": [""], "labels": LABELS}, 422, "invalid_input", "images[0]"),
    (
        "ICO is not served",
        {"images": [b64(_image_bytes("ICO"))], "labels": LABELS},
        415,
        "unsupported_media_type",
        "images[0]",
    ),
    (
        "data URL of text",
        {"images": ["data:text/plain;base64,aGVsbG8="], "labels": LABELS},
        415,
        "unsupported_media_type",
        "images[0]",
    ),
    ("no labels", {"images": [b64(shape_png())], "labels": []}, 422, "invalid_input", "labels"),
    ("empty label", {"images": [b64(shape_png())], "labels": ["cat", "  "]}, 422, "invalid_input", "labels[1]"),
    ("over-long label", {"images": [b64(shape_png())], "labels": ["x" * 301]}, 422, "invalid_input", "labels[0]"),
    (
        "too many labels",
        {"images": [b64(shape_png())], "labels": [f"l{i}" for i in range(1001)]},
        422,
        "invalid_input",
        "labels",
    ),
    (
        "template without {}",
        {"images": [b64(shape_png())], "labels": LABELS, "templates": ["a photo"]},
        422,
        "invalid_input",
        "templates",
    ),
    (
        "unknown preset",
        {"images": [b64(shape_png())], "labels": LABELS, "templates": "nope"},
        422,
        "invalid_input",
        "templates",
    ),
    ("no images", {"images": [], "labels": LABELS}, 422, "invalid_input", "images"),
    ("top_k zero", {"images": [b64(shape_png())], "labels": LABELS, "top_k": 0}, 422, "invalid_input", "top_k"),
    ("unknown field", {"images": [b64(shape_png())], "labels": LABELS, "label": "x"}, 422, "invalid_input", "label"),
    ("labels not a list", {"images": [b64(shape_png())], "labels": "cat"}, 422, "invalid_input", "labels"),
]


@pytest.mark.parametrize(("body", "status", "code", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_bad_json_requests(shared_demo, body, status, code, param):
    _, client = shared_demo
    _assert_error(await client.post("/classify", json=body), status, code, param)
    await _still_serving(client)


@pytest.mark.parametrize("template", ["{[{}]}", "{0.real} {}", "{!r} {}"])
async def test_templates_that_format_cannot_use_are_a_422(shared_demo, template):
    _, client = shared_demo
    response = await client.post(
        "/classify", json={"images": [b64(shape_png())], "labels": LABELS, "templates": [template]}
    )
    assert response.status_code == 422 and response.json()["error"]["param"] == "templates"


async def test_too_many_prompts_is_a_422():
    async with running_app(max_prompts=500) as (_, client):
        body = {"images": [b64(shape_png())], "labels": [f"l{i}" for i in range(100)], "templates": "simple"}
        response = await client.post("/classify", json=body)  # 100 x 7 = 700 prompts
        assert response.status_code == 422 and "700 prompts" in response.json()["error"]["message"]


async def test_malformed_json_is_a_400(shared_demo):
    _, client = shared_demo
    response = await client.post("/classify", content=b"{not json", headers={"content-type": "application/json"})
    _assert_error(response, 400, "invalid_request")
    await _still_serving(client)


async def test_wrong_content_type_is_a_415(shared_demo):
    _, client = shared_demo
    response = await client.post("/classify", content=b"hello", headers={"content-type": "text/plain"})
    _assert_error(response, 415, "unsupported_media_type")


async def test_multipart_non_image_part_is_a_415(shared_demo):
    _, client = shared_demo
    files = [("image", ("notes.txt", b"hello", "text/plain"))]
    _assert_error(await client.post("/classify", files=files, data={"labels": "a,b"}), 415, "unsupported_media_type")
    missing = await client.post("/classify", data={"labels": "a,b"}, files=[("other", ("x", b"1", "image/png"))])
    _assert_error(missing, 422, "invalid_input", "image")
    bad_top_k = await client.post(
        "/classify", files=[("image", ("a.png", shape_png(), "image/png"))], data={"labels": "a,b", "top_k": "-1"}
    )
    _assert_error(bad_top_k, 422, "invalid_input", "top_k")
    await _still_serving(client)


@pytest.mark.parametrize("top_k", ["²", "9" * 5000, "1.5", "-2"])
async def test_multipart_top_k_that_is_not_a_plain_number_is_a_422(shared_demo, top_k):
    _, client = shared_demo
    files = [("image", ("a.png", shape_png(), "image/png"))]
    response = await client.post("/classify", files=files, data={"labels": "a,b", "top_k": top_k})
    assert response.status_code == 422 and response.json()["error"]["param"] == "top_k"


async def test_body_and_pixel_limits_are_413():
    async with running_app(max_body_mb=0.05, max_image_pixels=40_000) as (_, client):
        big_body = {"images": [b64(b"x" * 100_000)], "labels": LABELS}
        _assert_error(await client.post("/classify", json=big_body), 413, "payload_too_large")
        wide = {"images": [b64(_image_bytes("PNG", size=(300, 200)))], "labels": LABELS}
        _assert_error(await client.post("/classify", json=wide), 413, "payload_too_large", "images[0]")
        await _still_serving(client)


async def test_body_errors_on_pydantic_routes_keep_their_status():
    async with running_app(max_body_mb=0.1) as (_, client):

        async def chunked():  # no Content-Length: the limit can only be enforced while reading
            yield b'{"texts": ["'
            for _ in range(4):
                yield b"a" * 50_000
            yield b'"]}'

        for path in ("/embed", "/v1/embeddings", "/classify"):
            response = await client.post(path, content=chunked(), headers={"content-type": "application/json"})
            assert response.status_code == 413, (path, response.text)
            assert response.json()["error"]["code"] == "payload_too_large"
        not_utf8 = await client.post(
            "/embed", content=b'{"texts": ["\xff"]}', headers={"content-type": "application/json"}
        )
        assert not_utf8.status_code in (400, 422) and not_utf8.json()["error"]["code"] in (
            "invalid_request",
            "invalid_input",
        )
        no_boundary = await client.post("/classify", content=b"x", headers={"content-type": "multipart/form-data"})
        assert no_boundary.status_code == 400 and no_boundary.json()["error"]["code"] == "invalid_request"


async def test_too_many_images_is_a_422():
    async with running_app(max_images=2) as (_, client):
        body = {"images": [b64(shape_png())] * 3, "labels": LABELS}
        _assert_error(await client.post("/classify", json=body), 422, "invalid_input", "images")


async def test_unknown_route_and_method_use_the_error_shape(shared_demo):
    _, client = shared_demo
    _assert_error(await client.get("/nope"), 404, "not_found")
    _assert_error(await client.get("/classify"), 405, "method_not_allowed")


class _Gate:
    """Holds image-engine calls while closed, so requests pile up behind a busy engine."""

    def __init__(self) -> None:
        self.closed = threading.Event()
        self.opened = threading.Event()
        self.held = threading.Event()  # an engine call is waiting at the closed gate
        self.timed_out = threading.Event()  # a held call gave up waiting for the test to open the gate

    def close(self) -> None:
        self.opened.clear()
        self.closed.set()

    def open(self) -> None:
        self.closed.clear()
        self.opened.set()


@pytest.fixture
def image_gate(monkeypatch):
    """Test seam: the real ONNX engine behind a gate (closed only after startup, so warm-up runs freely)."""
    gate = _Gate()
    real_call = OnnxRuntimeEngine.__call__

    def gated(self, inputs: np.ndarray) -> np.ndarray:
        if self.role == "image" and gate.closed.is_set():
            gate.held.set()
            if not gate.opened.wait(timeout=30):
                gate.timed_out.set()
        return real_call(self, inputs)

    monkeypatch.setattr(OnnxRuntimeEngine, "__call__", gated)
    yield gate
    gate.open()


async def test_overload_is_a_503_with_retry_after(image_gate):
    async with running_app(max_batch_size=1, max_wait_ms=0, max_queue=2) as (app, client):
        body = {"images": [b64(shape_png())], "labels": LABELS}
        await _still_serving(client)  # label vectors cached: only the image engine is in the way
        image_gate.close()
        # One request first, held in the engine; only then the other seven. Sent together, they could all reach
        # the queue before the worker takes one out, and the split would be 2 served and 6 refused.
        tasks = [asyncio.create_task(client.post("/classify", json=body))]
        assert await asyncio.to_thread(image_gate.held.wait, 30)
        tasks += [asyncio.create_task(client.post("/classify", json=body)) for _ in range(7)]
        # Wait until each of the seven is either queued or refused, so a bound off by one either way shows below.
        refused = {"engine": "image", "reason": "queue_full"}
        batcher = app.state.pipeline.image_batcher
        await wait_until(
            lambda: app.state.metrics.value("clipserve_rejected_total", refused) + batcher.depth == 7,
            "all seven requests queued or refused",
        )
        image_gate.open()
        responses = await asyncio.gather(*tasks)
        statuses = sorted(r.status_code for r in responses)
        # One in the engine, two queued, the other five refused at once.
        assert statuses.count(200) == 3 and statuses.count(503) == 5, statuses
        overloaded = next(r for r in responses if r.status_code == 503)
        _assert_error(overloaded, 503, "overloaded")
        assert overloaded.headers["retry-after"].isdigit()
        await _still_serving(client)


async def test_missed_deadline_is_a_504(image_gate):
    async with running_app(request_timeout_s=0.5) as (_, client):
        image_gate.close()
        response = await client.post("/classify", json={"images": [b64(shape_png())], "labels": LABELS})
        _assert_error(response, 504, "deadline_exceeded")
        # Answered while the engine still held the image (or before it got there), not after the gate gave up.
        assert not image_gate.timed_out.is_set()
        image_gate.open()
        await _still_serving(client)


async def test_api_keys():
    async with running_app(api_keys="k1,k2") as (_, client):
        body = {"images": [b64(shape_png())], "labels": LABELS}
        _assert_error(await client.post("/classify", json=body), 401, "unauthorized")
        _assert_error(
            await client.post("/classify", json=body, headers={"authorization": "Bearer nope"}), 401, "unauthorized"
        )
        assert (await client.post("/classify", json=body, headers={"authorization": "Bearer k2"})).status_code == 200
        assert (await client.post("/classify", json=body, headers={"x-api-key": "k1"})).status_code == 200
        assert (await client.get("/healthz")).status_code == 200  # probes stay open for the orchestrator
        assert (await client.get("/metrics")).status_code == 200


async def test_errors_are_counted_by_route_and_status():
    async with running_app() as (app, client):  # an app of its own: the counts below are absolute
        await client.post("/classify", json={"images": [b64(b"nope")], "labels": LABELS})
        value = app.state.metrics.value("clipserve_requests_total", {"route": "/classify", "status": "422"})
        assert value == 1
        text = (await client.get("/metrics")).text
        assert 'clipserve_requests_total{route="/classify",status="422"} 1.0' in text
        assert json.loads(json.dumps(text.count("clipserve_")))  # non-empty exposition


async def test_a_405_names_every_method_of_the_path() -> None:
    async with running_app() as (_, client):
        response = await client.post("/v1/classifiers/some-name")
        assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
        assert response.headers["allow"] == "DELETE, GET, PUT"
        assert (await client.patch("/classify")).headers["allow"] == "POST"
