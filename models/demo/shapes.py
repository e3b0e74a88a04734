"""Deterministic generator of captioned synthetic images for the built-in demo model.

Every sample is one filled shape of one named colour, drawn at a random size, position and rotation on a
solid, gradient or noise background, saved as JPEG (random quality) or PNG, at a random image size and
aspect ratio. The shape always sits inside the centre square, so the eval transform's centre crop keeps it.
Torch-free: Pillow and numpy only.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 215, 35),
    "purple": (135, 50, 175),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
# Never drawn in training: zero-shot on these measures composition, not memorisation.
# One per colour, every shape at least once.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "star"),
        ("green", "hexagon"),
        ("blue", "triangle"),
        ("yellow", "circle"),
        ("purple", "square"),
        ("orange", "hexagon"),
        ("white", "triangle"),
        ("black", "star"),
    }
)
ALL_COMPOSITIONS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
SEEN_COMPOSITIONS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_COMPOSITIONS if p not in HELD_OUT)
HELD_OUT_COMPOSITIONS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_COMPOSITIONS if p in HELD_OUT)

_SIZE_WORDS = ("small", "large")
_BACKGROUND_KINDS = ("solid", "gradient", "noise")


@dataclass(frozen=True)
class Attributes:
    colour: str
    shape: str
    size_word: str  # "small" | "large"
    background: str  # "solid" | "gradient" | "noise"
    background_tone: str  # "light" | "dark" | "grey" | "colourful"


@dataclass(frozen=True)
class Sample:
    image: Image.Image  # decoded RGB image, as a client would upload it
    attributes: Attributes


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "circle":
        n, radii = 48, [r]
    elif shape == "square":
        n, radii = 4, [r]
    elif shape == "triangle":
        n, radii = 3, [r]
    elif shape == "hexagon":
        n, radii = 6, [r]
    elif shape == "star":
        n, radii = 10, [r, r * 0.42]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    points = []
    for i in range(n):
        a = angle + 2 * math.pi * i / n
        rad = radii[i % len(radii)]
        points.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return points


def _pick_background_colour(rng: np.random.Generator, shape_rgb: np.ndarray) -> tuple[np.ndarray, str]:
    """A background far enough from the shape's colour that the shape stays visible."""
    for _ in range(100):
        if rng.random() < 0.75:  # mostly greys and muted tones, as in product photos
            v = rng.uniform(0, 255)
            rgb = np.clip(v + rng.normal(0, 12, 3), 0, 255)
            tone = "light" if v > 170 else "dark" if v < 85 else "grey"
        else:
            rgb = rng.uniform(0, 255, 3)
            tone = "colourful"
        if np.linalg.norm(rgb - shape_rgb) > 140:
            return rgb, tone
    return (255.0 - shape_rgb), "colourful"


def _background(rng: np.random.Generator, kind: str, w: int, h: int, base: np.ndarray) -> np.ndarray:
    if kind == "solid":
        return np.broadcast_to(base, (h, w, 3)).astype(np.float32)
    if kind == "gradient":
        other = np.clip(base + rng.normal(0, 35, 3), 0, 255)
        theta = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        t = (xs / max(w - 1, 1)) * math.cos(theta) + (ys / max(h - 1, 1)) * math.sin(theta)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        return base * (1 - t[..., None]) + other * t[..., None]
    noise = rng.standard_normal((h, w, 3), dtype=np.float32) * np.float32(rng.uniform(6, 22))
    return np.clip(base.astype(np.float32) + noise, 0, 255)


def render(rng: np.random.Generator, colour: str, shape: str, *, min_side: int = 40, max_side: int = 320) -> Sample:
    """Draws one sample; the same generator state always gives the same image."""
    # Log-uniform: as many thumbnails as large photos, and cheap to draw on average.
    short = int(round(math.exp(rng.uniform(math.log(min_side), math.log(max_side)))))
    aspect = float(np.exp(rng.uniform(math.log(0.6), math.log(1.7))))
    w, h = (int(round(short * aspect)), short) if aspect >= 1 else (short, int(round(short / aspect)))
    side = min(w, h)

    shape_rgb = np.clip(np.array(COLOURS[colour], np.float32) + rng.normal(0, 14, 3), 0, 255)
    bg_rgb, tone = _pick_background_colour(rng, shape_rgb)
    kind = _BACKGROUND_KINDS[int(rng.integers(len(_BACKGROUND_KINDS)))]
    pixels = _background(rng, kind, w, h, bg_rgb)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")

    rel = float(rng.uniform(0.16, 0.46))  # circumradius as a fraction of the short side
    size_word = "small" if rel < 0.28 else "large"
    r = rel * side
    # Keep the shape inside the centre square (what the eval transform's centre crop keeps).
    x0, y0 = (w - side) / 2, (h - side) / 2
    slack = max(side / 2 - r, 0.0)
    cx = x0 + side / 2 + rng.uniform(-slack, slack) * 0.9
    cy = y0 + side / 2 + rng.uniform(-slack, slack) * 0.9
    angle = float(rng.uniform(0, 2 * math.pi))
    ImageDraw.Draw(image).polygon(_polygon(shape, cx, cy, r, angle), fill=tuple(int(v) for v in shape_rgb))

    buffer = io.BytesIO()
    if rng.random() < 0.7:
        image.save(buffer, "JPEG", quality=int(rng.integers(25, 96)))
    else:
        image.save(buffer, "PNG", compress_level=1)
    decoded = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return Sample(decoded, Attributes(colour, shape, size_word, kind, tone))


def random_composition(rng: np.random.Generator, pool: tuple[tuple[str, str], ...]) -> tuple[str, str]:
    return pool[int(rng.integers(len(pool)))]


# --- captions -------------------------------------------------------------------------------------------
# Many phrasings, as web alt-text would give: full descriptions, bare noun phrases, colour-only and
# shape-only captions (so that bare "red" or "circle" mean something), with optional size and background.
_FULL = (
    "a {c} {s}",
    "{c} {s}",
    "a {c} {s}.",
    "a photo of a {c} {s}.",
    "a picture of a {c} {s}",
    "an image of a {c} {s}",
    "a drawing of a {c} {s}",
    "a {sz} {c} {s}",
    "a photo of a {sz} {c} {s} on a {bg} background",
    "a {c} {s} on a {bg} background",
    "a {s} that is {c}",
    "a {c} coloured {s}",
    "a {c} {s} shape",
    "the {s} is {c}",
    "{c} {s} on {bg}",
    "a close-up photo of the {c} {s}.",
    "there is a {c} {s} in the picture",
    "one {c} {s}",
    "a rendering of a {c} {s}.",
    "a {s}, {c}",
    "a {sz} {s} which is {c}",
)
_SHAPE_ONLY = ("a {s}", "{s}", "a photo of a {s}.", "a {s} shape", "a drawing of a {s}", "the {s}.", "a {sz} {s}")
_COLOUR_ONLY = ("{c}", "something {c}", "a photo of a {c}.", "a {c} thing", "the colour {c}", "it is {c}.")
# Words a caption can carry about an image; a caption matches every image that agrees on the ones it uses.
CAPTION_ATTRIBUTES = {"c": "colour", "s": "shape", "sz": "size_word", "bg": "background_tone"}


@dataclass(frozen=True)
class Caption:
    text: str
    attributes: dict[str, str]  # the Sample fields this caption states, e.g. {"colour": "red"}

    def matches(self, attributes: Attributes) -> bool:
        return all(getattr(attributes, field) == value for field, value in self.attributes.items())


def caption(rng: np.random.Generator, attributes: Attributes) -> Caption:
    u = rng.random()
    pool = _SHAPE_ONLY if u < 0.14 else _COLOUR_ONLY if u < 0.28 else _FULL
    template = pool[int(rng.integers(len(pool)))]
    values = {key: getattr(attributes, field) for key, field in CAPTION_ATTRIBUTES.items()}
    used = {key: values[key] for key in CAPTION_ATTRIBUTES if "{" + key + "}" in template}
    return Caption(template.format(**values), {CAPTION_ATTRIBUTES[k]: v for k, v in used.items()})
