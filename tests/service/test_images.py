"""Uploaded image bytes through /classify: encodings accepted, and images refused before they cost anything."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from models.preprocess import ImageTransform
from tests.service.conftest import b64, shape_png

pytestmark = pytest.mark.asyncio(loop_scope="module")

LABELS = ["red circle", "blue triangle"]
DATA = Path(__file__).parent / "data"


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buffer, "PNG")
    return buffer.getvalue()


async def test_extreme_aspect_ratio_is_refused_before_the_resize(shared_demo, monkeypatch):
    """A 1x300000 strip is under the pixel limit, but resizing its short side to 64 would make 1.2 G pixels."""
    _, client = shared_demo
    resized: list[tuple[int, int]] = []
    real_transform = ImageTransform.__call__

    def watched(self, image):  # test seam: the resize-and-crop the refusal must come before
        resized.append(image.size)
        if image.height > 100_000:  # a regression: fail at once rather than allocate the 1.2 G pixels
            raise AssertionError("the strip reached the resize")
        return real_transform(self, image)

    monkeypatch.setattr(ImageTransform, "__call__", watched)
    response = await client.post("/classify", json={"images": [b64(_png(1, 300_000))], "labels": LABELS})
    assert response.status_code == 413, response.text
    assert "aspect ratio" in response.json()["error"]["message"]
    assert resized == []  # refused from the image's size alone: nothing was resized
    panorama = await client.post("/classify", json={"images": [b64(_png(1200, 200))], "labels": LABELS})
    assert panorama.status_code == 200  # ordinary wide images still pass
    assert resized == [(1200, 200)]


async def test_corrupt_exif_is_a_422(shared_demo):
    _, client = shared_demo
    data = (DATA / "corrupt_exif.jpg").read_bytes()  # a JPEG whose EXIF block makes Pillow raise struct.error
    response = await client.post("/classify", json={"images": [b64(data)], "labels": LABELS})
    assert response.status_code == 422 and response.json()["error"]["param"] == "images[0]"


async def test_line_wrapped_base64_is_accepted(shared_demo):
    _, client = shared_demo
    wrapped = base64.encodebytes(shape_png()).decode()  # 76-character lines, as the `base64` tool writes
    assert "\n" in wrapped
    response = await client.post("/classify", json={"images": [wrapped], "labels": LABELS})
    assert response.status_code == 200, response.text
