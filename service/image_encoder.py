"""Images -> L2-normalised image embeddings: decode and preprocess in the decode pool, then the batched image engine.

Built once by the pipeline and handed to whoever needs image vectors (the pipeline's /classify, /embed, and the
saved classifiers' few-shot examples), like the TextEncoder. On the GPU path the engine leaves embeddings in
device memory: `device_parts` keeps them there for the similarity kernel, `__call__` copies them to the host.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

import numpy as np

from service import request_context
from service.batcher import DynamicBatcher
from service.deadline import Deadline
from service.images import ImageInput
from service.metrics import Metrics


class ImageEncoder:
    def __init__(
        self,
        preprocess: Callable[[bytes, str], np.ndarray],
        batcher: DynamicBatcher,
        pool: Executor,
        metrics: Metrics,
        *,
        on_device: bool,
    ) -> None:
        self._preprocess, self._batcher, self._pool, self._metrics = preprocess, batcher, pool, metrics
        self.on_device = on_device

    def _preprocess_one(self, image: ImageInput) -> tuple[np.ndarray, float, float]:
        """The image's pixels, and the milliseconds its base64 decoding and its decoding + preprocessing took."""
        start = time.perf_counter()
        data = image.decoded()
        decoded = time.perf_counter()
        pixels = self._preprocess(data, image.param)
        done = time.perf_counter()
        self._metrics.preprocess_seconds.observe(done - start)
        return pixels, (decoded - start) * 1000, (done - decoded) * 1000

    async def device_parts(self, images: Sequence[ImageInput], deadline: Deadline) -> list[Any]:
        """The engine's output for the images, in parts of at most one engine batch: host arrays, or DeviceArrays
        on the GPU path (the batcher slices those but cannot join them across engine calls)."""
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self._pool, self._preprocess_one, image) for image in images]
        done = await asyncio.gather(*jobs)
        # Noted here, in the request's task (the pool's threads do not see its context); summed over the images,
        # which the pool works on in parallel.
        request_context.note_time("base64", sum(base64_ms for _, base64_ms, _ in done))
        request_context.note_time("preprocess", sum(preprocess_ms for _, _, preprocess_ms in done))
        pixels = np.stack([image_pixels for image_pixels, _, _ in done])
        step = self._batcher.max_batch_size if self.on_device else len(pixels)
        parts = [self._batcher.submit(pixels[i : i + step], deadline=deadline.at) for i in range(0, len(pixels), step)]
        return list(await asyncio.gather(*parts))

    async def __call__(self, images: Sequence[ImageInput], deadline: Deadline) -> np.ndarray:
        """Normalised image embeddings [N, D] on the host."""
        parts = await self.device_parts(images, deadline)
        if not self.on_device:
            return parts[0]
        loop = asyncio.get_running_loop()
        host = [await loop.run_in_executor(self._pool, part.to_host) for part in parts]  # blocking copies
        return np.concatenate(host)
