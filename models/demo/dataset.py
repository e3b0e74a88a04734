"""A pool of rendered, preprocessed training images, made in parallel but deterministically.

Each chunk of the pool has its own random stream seeded by (seed, chunk index), so the pool is the same
whatever the number of worker processes. Images are stored as uint8 after the serving transform's geometry
(resize shortest side, centre crop): training sees exactly the pixels the service will compute.
Torch-free, so that spawned workers start fast.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from models.demo import shapes
from models.demo.config import PREPROCESS
from models.preprocess import ImageTransform, PreprocessConfig

CHUNK = 500


@dataclass
class ImagePool:
    pixels: np.ndarray  # [N, H, W, 3] uint8
    attributes: list[shapes.Attributes]


def render_chunk(args: tuple[int, int, int, tuple[tuple[str, str], ...]]) -> ImagePool:
    seed, chunk, count, compositions = args
    rng = np.random.default_rng([seed, chunk])
    transform = ImageTransform(PreprocessConfig.from_dict(PREPROCESS))
    size = transform.config.image_size
    pixels = np.empty((count, size, size, 3), np.uint8)
    attributes = []
    for i in range(count):
        colour, shape = shapes.random_composition(rng, compositions)
        sample = shapes.render(rng, colour, shape)
        pixels[i] = transform.to_uint8(sample.image)
        attributes.append(sample.attributes)
    return ImagePool(pixels, attributes)


def make_pool(
    size: int,
    seed: int,
    compositions: tuple[tuple[str, str], ...] = shapes.SEEN_COMPOSITIONS,
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
) -> ImagePool:
    jobs = [(seed, chunk, min(CHUNK, size - start), compositions) for chunk, start in enumerate(range(0, size, CHUNK))]
    parts: list[ImagePool] = []
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for part in pool.imap(render_chunk, jobs):  # imap keeps chunk order: same pool for any worker count
            parts.append(part)
            if progress:
                progress(len(part.attributes))
    return ImagePool(np.concatenate([p.pixels for p in parts]), [a for p in parts for a in p.attributes])
