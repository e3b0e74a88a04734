"""Regressions from a review of hostile inputs: each used to give a 500, hang the event loop or waste the engine."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.parity import check_graph
from service.label_cache import LabelCache
from service.metrics import Metrics
from tests.service.conftest import b64, running_app, shape_png

LABELS = ["red circle", "blue triangle"]
DATA = Path(__file__).parent / "data"


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buffer, "PNG")
    return buffer.getvalue()


async def test_extreme_aspect_ratio_is_refused_before_the_resize(demo):
    """A 1x300000 strip is under the pixel limit, but resizing its short side to 64 would make 1.2 G pixels."""
    _, client = demo
    started = time.monotonic()
    response = await client.post("/classify", json={"images": [b64(_png(1, 300_000))], "labels": LABELS})
    assert response.status_code == 413, response.text
    assert "aspect ratio" in response.json()["error"]["message"]
    assert time.monotonic() - started < 5
    panorama = await client.post("/classify", json={"images": [b64(_png(1200, 200))], "labels": LABELS})
    assert panorama.status_code == 200  # ordinary wide images still pass


async def test_corrupt_exif_is_a_422(demo):
    _, client = demo
    data = (DATA / "corrupt_exif.jpg").read_bytes()  # a JPEG whose EXIF block makes Pillow raise struct.error
    response = await client.post("/classify", json={"images": [b64(data)], "labels": LABELS})
    assert response.status_code == 422 and response.json()["error"]["param"] == "images[0]"


@pytest.mark.parametrize("template", ["{[{}]}", "{0.real} {}", "{!r} {}"])
async def test_templates_that_format_cannot_use_are_a_422(demo, template):
    _, client = demo
    response = await client.post(
        "/classify", json={"images": [b64(shape_png())], "labels": LABELS, "templates": [template]}
    )
    assert response.status_code == 422 and response.json()["error"]["param"] == "templates"


@pytest.mark.parametrize("top_k", ["²", "9" * 5000, "1.5", "-2"])
async def test_multipart_top_k_that_is_not_a_plain_number_is_a_422(demo, top_k):
    _, client = demo
    files = [("image", ("a.png", shape_png(), "image/png"))]
    response = await client.post("/classify", files=files, data={"labels": "a,b", "top_k": top_k})
    assert response.status_code == 422 and response.json()["error"]["param"] == "top_k"


async def test_line_wrapped_base64_is_accepted(demo):
    _, client = demo
    wrapped = base64.encodebytes(shape_png()).decode()  # 76-character lines, as the `base64` tool writes
    assert "\n" in wrapped
    response = await client.post("/classify", json={"images": [wrapped], "labels": LABELS})
    assert response.status_code == 200, response.text


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


async def test_over_long_texts_are_refused(demo):
    _, client = demo
    response = await client.post("/embed", json={"texts": ["ok", "x" * 2001]})
    assert response.status_code == 422 and response.json()["error"]["param"] == "texts[1]"
    response = await client.post("/v1/embeddings", json={"input": "x" * 2001})
    assert response.status_code == 422 and response.json()["error"]["param"] == "input[0]"


async def test_too_many_prompts_is_a_422():
    async with running_app(max_prompts=500) as (_, client):
        body = {"images": [b64(shape_png())], "labels": [f"l{i}" for i in range(100)], "templates": "simple"}
        response = await client.post("/classify", json=body)  # 100 x 7 = 700 prompts
        assert response.status_code == 422 and "700 prompts" in response.json()["error"]["message"]


async def test_text_work_nobody_waits_for_is_stopped():
    """A request whose prompts outlast its deadline: the text engine must stop working for it, not run on."""
    # One prompt per engine call makes 32,000 prompts minutes of work, while tokenising them (done before the
    # first call) takes about a second here: the deadline lands mid-encoding, which is what this test is about.
    async with running_app(request_timeout_s=4.0, text_max_batch_size=1) as (app, client):
        batcher = app.state.pipeline.text_batcher
        body = {"images": [b64(shape_png())], "labels": [f"thing {i}" for i in range(400)], "templates": "imagenet"}
        response = await client.post("/classify", json=body)
        assert response.status_code == 504
        await asyncio.sleep(0.3)  # the call in flight finishes
        calls = batcher.engine_calls
        assert calls > 0, "the deadline passed before encoding began: the test would prove nothing"
        await asyncio.sleep(0.5)
        assert batcher.engine_calls == calls, "the abandoned encoding kept running"
        assert calls < 400 * 80  # it stopped well before the end
        # Inside the 4 s request timeout: a text engine still busy with the abandoned prompts would make this 504.
        small = await client.post("/classify", json={"images": [b64(shape_png())], "labels": LABELS})
        assert small.status_code == 200
        print(f"engine calls before the stop: {calls} of {400 * 80}")


async def test_template_sets_with_separators_do_not_share_cache_keys():
    async def encode(prompts: list[str]) -> np.ndarray:
        return np.ones((len(prompts), 4), np.float32) / 2

    cache = LabelCache(namespace="t", dim=4, encode=encode, metrics=Metrics())
    assert cache.key("x", ["a {}\x00b", "c {}"]) != cache.key("x", ["a {}", "b\x00c {}"])


class _FakeGraph:
    """Test double for an ONNX Runtime session: returns fixed outputs."""

    def __init__(self, outputs: np.ndarray) -> None:
        self.outputs = outputs

    def get_inputs(self):
        return [type("Input", (), {"name": "x"})()]

    def run(self, _, feeds):
        return [self.outputs[: len(feeds["x"])]]


def test_parity_gate_fails_on_non_finite_values():
    reference = np.eye(64, 8, dtype=np.float32) + 0.1
    probe = np.zeros((64, 3), np.float32)
    assert check_graph("g.onnx", "image", "fp32", _FakeGraph(reference), probe, reference).passed
    broken = reference.copy()
    broken[5, 2] = np.nan
    assert not check_graph("g.onnx", "image", "fp32", _FakeGraph(broken), probe, reference).passed
    assert not check_graph("g.onnx", "image", "fp32", _FakeGraph(reference), probe, broken).passed
