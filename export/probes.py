"""The fixed probe set the parity gate runs: real images through the real preprocessing, real prompts
through the real tokenizer.

Nothing is downloaded: the images are rendered scenes (coloured shapes on solid, gradient and noisy
backgrounds, JPEG- or PNG-encoded and decoded again, in many sizes and aspect ratios) plus a few extreme
ones (flat black, flat white, pure noise) that exercise the ends of the normalised pixel range. Prompts are
labels of several kinds wrapped in the paper's templates, including long and non-ASCII ones that reach the
end-of-text truncation. Everything is seeded, so two exports see byte-identical inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from export.parity import ZeroShotTask
from models.demo import evaluate, shapes
from models.preprocess import ImageTransform, PreprocessConfig
from models.templates import IMAGENET_80, PRESETS, apply_templates
from models.tokenizer import ClipTokenizer, TokenizerSpec

PROBE_COUNT = 64  # the largest batch size the gate checks
PROBE_SEED = 20_261_129

_LABELS = (
    "golden retriever",
    "invoice",
    "a red circle",
    "blue square",
    "tabby cat",
    "espresso machine",
    "mountain bike",
    "handwritten receipt",
    "x-ray of a broken wrist",
    "crème brûlée",
    "東京タワー",
    "🚲 parked outside",
    "green hexagon",
    "yellow star",
    "a very long label that keeps going with many words so that the prompt overflows the shortest context "
    "windows any model here uses and must be truncated with an end token",
    "",
)


@dataclass(frozen=True)
class ProbeSet:
    pixels: np.ndarray  # [N, 3, S, S] float32, the model's preprocessing applied
    token_ids: np.ndarray  # [N, L] int64
    texts: tuple[str, ...]


def probe_images(count: int = PROBE_COUNT, seed: int = PROBE_SEED) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    extremes = [
        Image.new("RGB", (97, 61), (0, 0, 0)),
        Image.new("RGB", (300, 300), (255, 255, 255)),
        Image.fromarray(rng.integers(0, 256, (181, 243, 3), dtype=np.uint8), "RGB"),
    ]
    rendered = [
        shapes.render(rng, *shapes.random_composition(rng, shapes.ALL_COMPOSITIONS), min_side=24, max_side=640).image
        for _ in range(max(count - len(extremes), 0))
    ]
    return (extremes + rendered)[:count]


def probe_texts(count: int = PROBE_COUNT, seed: int = PROBE_SEED) -> tuple[str, ...]:
    rng = np.random.default_rng(seed + 1)
    texts = []
    for i in range(count):
        template = IMAGENET_80[int(rng.integers(len(IMAGENET_80)))]
        texts.append(template.format(_LABELS[i % len(_LABELS)]))
    return tuple(texts)


def build_probe_set(preprocess: PreprocessConfig, tokenizer: ClipTokenizer, spec: TokenizerSpec) -> ProbeSet:
    pixels = ImageTransform(preprocess).batch(probe_images())
    texts = probe_texts()
    return ProbeSet(pixels=pixels, token_ids=tokenizer(list(texts), spec.context_length), texts=texts)


DEMO_TASK_IMAGES = 500
DEMO_TASK_SEED = 20_261_130  # distinct from the training streams and from eval-demo's seed


def demo_zero_shot_task(tokenizer: ClipTokenizer, spec: TokenizerSpec, images: int = DEMO_TASK_IMAGES) -> ZeroShotTask:
    """The demo model's 40-way colour+shape task over all compositions, with the paper's photo template."""

    seen, held_out = evaluate.TASKS[0], evaluate.TASKS[1]
    pixels = np.concatenate([evaluate.render_set(task, images // 2, DEMO_TASK_SEED)[0] for task in (seen, held_out)])
    prompts = [text for label in evaluate.COMPOSITION_LABELS for text in apply_templates(PRESETS["photo"], label)]
    return ZeroShotTask(
        name=f"demo 40-way colour+shape, {len(pixels)} images, 'a photo of a {{}}.'",
        pixels=pixels,
        prompt_ids=tokenizer(prompts, spec.context_length),
        labels=len(evaluate.COMPOSITION_LABELS),
    )
