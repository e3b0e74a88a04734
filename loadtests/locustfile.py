"""Locust scenarios for clipserve: the request mixes real clients send.

    python -m loadtests.run --host http://127.0.0.1:8000                         # make loadtest: headless + summary
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000               # web UI on :8089
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 16 -r 16 -t 1m FixedLabelsUser

Users (weights give the default mix: mostly label-cache hits):

- `FixedLabelsUser` (6): one image per /classify, always the same label set (`--labels`, `--label-pool` sets):
  after the first request every label vector comes from the label cache.
- `MultiImageUser` (2): `--images-per-request` images (default 4) per /classify, the same fixed labels.
- `FreshLabelsUser` (1): one image per /classify with `--fresh-labels` labels never sent before (a run id, a
  counter and random words), so each label misses the cache and is encoded.
- `EmbedUser` (1): /embed with 8 texts, and /embed with 2 images.

Payloads are built once when the test starts (encoding a JPEG per request would load the client, not the
server). Options: --labels N, --label-pool N, --fresh-labels N, --images-per-request N, --image-size WxH,
--templates PRESET, --api-key KEY (default $CLIPSERVE_API_KEY). Any answer other than 200 is a failure,
reported with its status and the start of its body; so is a 200 whose body does not have one result per image
or text sent.
"""

from __future__ import annotations

import base64
import csv
import io
import itertools
import math
import os
import random
import secrets
from dataclasses import dataclass

from locust import FastHttpUser, constant, events, task
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment
from locust.runners import WorkerRunner
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV
from PIL import Image, ImageDraw

# The demo model knows these colours and shapes (models/demo/shapes.py's palette, repeated here because load
# generators talk HTTP only and run without the clipserve package); the everyday nouns make the label sets look
# like real ones.
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "star", "hexagon")
NOUNS = ("dog", "cat", "bicycle", "teapot", "guitar", "lamp", "chair", "apple", "car", "umbrella", "boat", "shoe")
ADJECTIVES = ("small", "large", "striped", "shiny", "wooden", "old", "plastic", "spotted", "round")
RGB = {
    "red": (215, 30, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 215, 35),
    "purple": (135, 50, 175),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
IMAGES = 8  # distinct JPEGs built at test start
EMBED_TEXTS = 8
EMBED_IMAGES = 2
ENVIRONMENT: list[Environment] = []


@events.init_command_line_parser.add_listener
def add_options(parser: LocustArgumentParser, **_: object) -> None:
    parser.add_argument("--labels", type=int, default=20, help="labels per fixed-label /classify request")
    parser.add_argument("--label-pool", type=int, default=1, help="distinct fixed label sets to rotate through")
    parser.add_argument("--fresh-labels", type=int, default=10, help="never-seen labels per FreshLabelsUser request")
    parser.add_argument("--images-per-request", type=int, default=4, help="images per MultiImageUser request")
    parser.add_argument("--image-size", default="640x480", help="WxH of the uploaded JPEGs")
    parser.add_argument("--templates", default="simple", help="template preset sent with each /classify request")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("CLIPSERVE_API_KEY", ""),
        help="sent as Authorization: Bearer <key> (default: $CLIPSERVE_API_KEY)",
    )


def vocabulary() -> list[str]:
    """Plausible labels: colour+shape first ('red circle'), then everyday things ('blue teapot', 'striped red dog')."""
    combos = itertools.chain(
        itertools.product(("",), COLOURS, SHAPES),
        itertools.product(("",), COLOURS, NOUNS),
        itertools.product(ADJECTIVES, COLOURS, SHAPES + NOUNS),
    )
    return [" ".join(filter(None, words)) for words in combos]


def fixed_label_sets(labels: int, pool: int) -> list[list[str]]:
    words = vocabulary()
    if labels > len(words):
        raise ValueError(f"--labels {labels}: at most {len(words)} distinct fixed labels")
    first = words[:labels]  # set 0: the plainest labels ('red circle', 'red square', ...)
    rng = random.Random(0)
    return [first] + [rng.sample(words, labels) for _ in range(pool - 1)]


class FreshLabels:
    """Labels no server has seen: this process's random run id and a counter, after a random colour and thing."""

    def __init__(self) -> None:
        self.run_id = secrets.token_hex(3)
        self.counter = itertools.count()
        self.rng = random.Random()

    def __call__(self, n: int) -> list[str]:
        return [
            f"{self.rng.choice(COLOURS)} {self.rng.choice(SHAPES + NOUNS)} {self.run_id}-{next(self.counter)}"
            for _ in range(n)
        ]


def _shape_points(shape: str, x: float, y: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "star":
        radii = [r if i % 2 == 0 else r * 0.45 for i in range(10)]
    else:
        radii = [r] * {"square": 4, "triangle": 3, "hexagon": 6}[shape]
    step = 2 * math.pi / len(radii)
    return [(x + q * math.cos(angle + i * step), y + q * math.sin(angle + i * step)) for i, q in enumerate(radii)]


def shape_jpeg(width: int, height: int, seed: int) -> bytes:
    """A coloured shape on a plain, lightly varied background: what the demo model was trained to name."""
    rng = random.Random(seed)
    colour, shape = COLOURS[seed % len(COLOURS)], SHAPES[seed % len(SHAPES)]
    background = (rng.randrange(150, 230), rng.randrange(150, 230), rng.randrange(150, 230))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    r = min(width, height) * rng.uniform(0.2, 0.35)
    x, y = rng.uniform(r, width - r), rng.uniform(r, height - r)
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=RGB[colour])
    else:
        draw.polygon(_shape_points(shape, x, y, r, rng.uniform(0, math.pi)), fill=RGB[colour])
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@events.init.add_listener
def remember_environment(environment: Environment, **_: object) -> None:
    ENVIRONMENT.append(environment)


@events.quit.add_listener
def write_final_csv(**_: object) -> None:
    """Locust rewrites its --csv files once a second while it runs, not after the last requests, so they miss up
    to a second of the run. This writes them once more with the final numbers (the ones in the HTML report and
    the console summary); Locust's own writer has flushed and truncated them by then and only closes them."""
    if not ENVIRONMENT or isinstance(ENVIRONMENT[-1].runner, WorkerRunner):
        return
    environment = ENVIRONMENT[-1]
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if not prefix:
        return
    writer = StatsCSV(environment, PERCENTILES_TO_REPORT)
    for suffix, write in (("stats", writer.requests_csv), ("failures", writer.failures_csv)):
        with open(f"{prefix}_{suffix}.csv", "w", newline="") as file:
            write(csv.writer(file))


@dataclass
class Payloads:
    """Everything the users send, built once when the test starts."""

    images: list[str]  # base64 JPEGs
    label_sets: list[list[str]]
    texts: list[str]
    fresh: FreshLabels
    templates: str
    images_per_request: int
    fresh_labels: int
    headers: dict[str, str]

    def some_images(self, n: int) -> list[str]:
        return random.sample(self.images, n) if n <= len(self.images) else random.choices(self.images, k=n)


PAYLOADS: list[Payloads] = []  # one, set at test start


@events.test_start.add_listener
def build_payloads(environment: Environment, **_: object) -> None:
    options = environment.parsed_options
    assert options is not None  # started from the command line (locust or loadtests.run)
    width, height = (int(v) for v in options.image_size.lower().split("x"))
    PAYLOADS[:] = [
        Payloads(
            images=[base64.b64encode(shape_jpeg(width, height, seed)).decode() for seed in range(IMAGES)],
            label_sets=fixed_label_sets(options.labels, options.label_pool),
            texts=[f"a photo of a {label}." for label in vocabulary()],
            fresh=FreshLabels(),
            templates=options.templates,
            images_per_request=options.images_per_request,
            fresh_labels=options.fresh_labels,
            headers={"authorization": f"Bearer {options.api_key}"} if options.api_key else {},
        )
    ]


class ClipserveUser(FastHttpUser):
    abstract = True
    wait_time = constant(0)  # closed loop: each user sends its next request as soon as one returns

    @property
    def payloads(self) -> Payloads:
        return PAYLOADS[0]

    def post(self, path: str, body: dict, name: str, rows: tuple[str, int]) -> None:
        """POST `body`; a failure unless the answer is 200 with `rows[1]` entries in its list `rows[0]`."""
        headers = self.payloads.headers
        with self.client.post(path, json=body, headers=headers, name=name, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {(r.text or str(r.error or ''))[:200]}")
                return
            key, expected = rows
            try:
                got = len(r.json()[key])
            except (ValueError, KeyError, TypeError) as error:
                r.failure(f"200 with an unexpected body ({error!r}): {(r.text or '')[:200]}")
                return
            if got != expected:
                r.failure(f"200 with {got} {key}, expected {expected}")

    def classify(self, images: int, labels: list[str], name: str) -> None:
        body = {"images": self.payloads.some_images(images), "labels": labels, "templates": self.payloads.templates}
        self.post("/classify", body, name, ("results", images))


class FixedLabelsUser(ClipserveUser):
    """One image, the same labels every time: label-cache hits."""

    weight = 6

    @task
    def classify_fixed(self) -> None:
        self.classify(1, random.choice(self.payloads.label_sets), "/classify fixed labels")


class MultiImageUser(ClipserveUser):
    """Several images in one request (default 4), the same fixed labels."""

    weight = 2

    @task
    def classify_images(self) -> None:
        n = self.payloads.images_per_request
        self.classify(n, random.choice(self.payloads.label_sets), f"/classify {n} images")


class FreshLabelsUser(ClipserveUser):
    """One image, labels never sent before: every label misses the cache and is encoded."""

    weight = 1

    @task
    def classify_fresh(self) -> None:
        self.classify(1, self.payloads.fresh(self.payloads.fresh_labels), "/classify fresh labels")


class EmbedUser(ClipserveUser):
    """/embed: a batch of captions, or a couple of images."""

    weight = 1

    @task
    def embed_texts(self) -> None:
        texts = random.sample(self.payloads.texts, EMBED_TEXTS)
        self.post("/embed", {"texts": texts}, "/embed texts", ("texts", EMBED_TEXTS))

    @task
    def embed_images(self) -> None:
        images = self.payloads.some_images(EMBED_IMAGES)
        self.post("/embed", {"images": images}, "/embed images", ("images", EMBED_IMAGES))
