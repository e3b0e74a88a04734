"""Locust scenarios for clipserve.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000               # web UI on :8089
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 32 -r 8 -t 1m ClassifyUser

Payloads are built once when the test starts (encoding a JPEG per request would load the client, not the
server). Options: --labels N (labels per request), --image-size WxH, --templates PRESET, --api-key KEY,
--label-pool N (distinct label sets, to exercise the label cache's misses as well as its hits).
"""

from __future__ import annotations

import base64
import io
import random

from locust import FastHttpUser, constant, events, task
from PIL import Image, ImageDraw

WORDS = ("red", "blue", "green", "yellow", "round", "square", "striped", "wooden", "metal", "tiny")
NOUNS = ("circle", "triangle", "dog", "invoice", "bicycle", "receipt", "mountain", "teapot", "guitar", "lamp")
PAYLOADS: dict[str, object] = {}


@events.init_command_line_parser.add_listener
def add_options(parser) -> None:  # type: ignore[no-untyped-def]
    parser.add_argument("--labels", type=int, default=20, help="labels per /classify request")
    parser.add_argument("--image-size", default="640x480", help="WxH of the uploaded JPEG")
    parser.add_argument("--templates", default="simple", help="template preset sent with each request")
    parser.add_argument("--label-pool", type=int, default=1, help="distinct label sets to rotate through")
    parser.add_argument("--api-key", default="", help="sent as Authorization: Bearer <key>")


def _jpeg(width: int, height: int, seed: int) -> bytes:
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y, r = rng.randrange(width), rng.randrange(height), rng.randrange(10, max(11, min(width, height) // 3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@events.test_start.add_listener
def build_payloads(environment, **_: object) -> None:  # type: ignore[no-untyped-def]
    options = environment.parsed_options
    width, height = (int(v) for v in options.image_size.lower().split("x"))
    rng = random.Random(0)
    images = [base64.b64encode(_jpeg(width, height, seed)).decode() for seed in range(8)]
    label_sets = [
        [f"{rng.choice(WORDS)} {rng.choice(NOUNS)} {pool}-{i}" for i in range(options.labels)]
        for pool in range(options.label_pool)
    ]
    PAYLOADS["classify"] = [
        {"images": [image], "labels": labels, "templates": options.templates}
        for image in images
        for labels in label_sets
    ]
    PAYLOADS["texts"] = [f"a photo of a {w} {n}" for w in WORDS for n in NOUNS]
    PAYLOADS["headers"] = {"authorization": f"Bearer {options.api_key}"} if options.api_key else {}


class ClipserveUser(FastHttpUser):
    abstract = True
    wait_time = constant(0)  # closed loop: each user sends its next request as soon as one returns

    def post(self, path: str, body: dict, name: str) -> None:
        with self.client.post(path, json=body, headers=PAYLOADS["headers"], name=name, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")


class ClassifyUser(ClipserveUser):
    @task
    def classify(self) -> None:
        self.post("/classify", random.choice(PAYLOADS["classify"]), "/classify")  # type: ignore[arg-type]


class EmbedTextUser(ClipserveUser):
    @task
    def embed_texts(self) -> None:
        texts = random.sample(PAYLOADS["texts"], 8)  # type: ignore[arg-type]
        self.post("/embed", {"texts": texts}, "/embed texts")
