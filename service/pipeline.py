"""The request pipeline behind the routes: decode, batch, look up label vectors, score.

It receives checked inputs (service/inputs.py) and the request's deadline from the route. Images are decoded
and preprocessed in a thread pool, then queued on the image batcher; label vectors come from the label cache,
whose misses go to the text encoder (tokenizer in the pool, then the separate, smaller text batcher). Both
halves of a /classify run concurrently; the similarity step joins them: numpy on the host, or the CUDA kernel
when the image engine leaves embeddings on the GPU (then only the top k comes back, and /embed copies back
the embeddings it returns).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from models.fewshot import Prototypes
from models.scoring import Scoring, cosines, ranked
from service import request_context
from service.batcher import DynamicBatcher
from service.classifiers.registry import Classifiers
from service.classifiers.store import DefinitionStore, FileDefinitions, RedisDefinitions, SliceFiles
from service.deadline import Deadline
from service.engines.base import EngineError
from service.engines.factory import EnginePair
from service.errors import ServiceError, StoreUnavailable
from service.gpu.preprocess import make_preprocessor
from service.gpu.similarity import CudaSimilarity, LabelSet, RankedScores, load_cuda_similarity
from service.image_encoder import ImageEncoder
from service.labels.cache import LabelCache
from service.labels.memory import MemoryTier
from service.labels.redis_tier import RedisTier
from service.metrics import Metrics
from service.model import ServedModel
from service.settings import Settings
from service.text_encoder import TextEncoder

if TYPE_CHECKING:
    from service.inputs import ClassifyInput

log = logging.getLogger("clipserve")

CACHE_KEY_VERSION = "v1"  # bump when the vector recipe changes, so old Redis entries are never read


@dataclass(frozen=True)
class Classification:
    labels: list[str]
    ranked: RankedScores  # per image: label indices, probabilities and cosines, most probable first
    images_ms: float
    labels_ms: float
    similarity_ms: float
    classifier: str | None = None  # the saved classifier named by the request


def _first_service_error(group: BaseExceptionGroup) -> BaseException:
    """The error a client should see: a ServiceError (bad input, overload) before anything else."""
    leaves = list(_leaves(group))
    return next((e for e in leaves if isinstance(e, ServiceError)), leaves[0])


def _leaves(error: BaseException):  # type: ignore[no-untyped-def]
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error


def _elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


class Pipeline:
    def __init__(self, settings: Settings, model: ServedModel, engines: EnginePair, metrics: Metrics) -> None:
        self.settings, self.model, self.engines, self.metrics = settings, model, engines, metrics
        self.decode_pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="clipserve-decode")
        try:
            self.preprocess_image = make_preprocessor(
                settings.preprocess_device,
                model.transform,
                settings.max_image_pixels,
                on_fallback=lambda reason: metrics.preprocess_fallbacks.labels(reason).inc(),
            )
        except RuntimeError as error:  # no torch/torchvision, or no CUDA device for them
            raise EngineError(f"CLIPSERVE_PREPROCESS_DEVICE={settings.preprocess_device}: {error}") from error
        image_limit = engines.image.max_batch_size or settings.max_batch_size
        text_limit = engines.text.max_batch_size or settings.text_max_batch_size
        self.cuda_similarity: CudaSimilarity | None = load_cuda_similarity(
            settings.similarity,
            engines.image,
            fatbin=settings.cuda_kernels,
            label_cache_bytes=int(settings.gpu_label_cache_mb * 1024 * 1024),
            dim=model.manifest.embed_dim,
            label_residuals=settings.gpu_label_residuals,
            gemm=settings.gpu_gemm,
        )
        self.similarity_backend = "cuda" if self.cuda_similarity else "numpy"
        # GPU scoring calls serialise on the kernel's workspace anyway: one thread of their own keeps them from
        # tying up the decode pool under load.
        self.similarity_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipserve-similarity")
        self.image_batcher = DynamicBatcher(
            "image",
            engines.image.embed_on_device if self.cuda_similarity else engines.image,  # type: ignore[attr-defined]
            max_batch_size=min(settings.max_batch_size, image_limit),
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            metrics=metrics,
        )
        self.text_batcher = DynamicBatcher(
            "text",
            engines.text,
            max_batch_size=min(settings.text_max_batch_size, text_limit),
            max_wait_ms=settings.text_max_wait_ms,
            max_queue=settings.text_max_queue,
            metrics=metrics,
        )
        self.encode_texts = TextEncoder(
            model.tokenizer, self.text_batcher, self.decode_pool, background_batch=settings.background_batch_size
        )
        self.encode_images = ImageEncoder(
            self.preprocess_image, self.image_batcher, self.decode_pool, metrics, on_device=bool(self.cuda_similarity)
        )
        dim = model.manifest.embed_dim
        redis = (
            RedisTier(
                settings.redis_url,
                dim=dim,
                metrics=metrics,
                timeout_s=settings.redis_timeout_ms / 1000,
                ttl_s=settings.cache_ttl_s,
                probe_interval_s=settings.redis_probe_interval_s,
            )
            if settings.redis_url
            else None
        )
        self.label_cache = LabelCache(
            # The content hash changes with any artifact, scoring or input change; the precision is what the text
            # engine computes in (fp16 TensorRT plans, int8 graphs); so vectors of one model and precision are
            # never read by another, and replicas on CPU and GPU nodes share what they can.
            namespace=f"clipserve:{CACHE_KEY_VERSION}:{model.content_hash[:16]}:{engines.text.precision}",
            dim=dim,
            encode=self.encode_texts,
            metrics=metrics,
            memory=MemoryTier(int(settings.cache_memory_mb * 1024 * 1024)),
            redis=redis,
            chunk_prompts=settings.label_chunk_prompts,
        )
        # Saved classifiers: definitions in Redis when configured (every replica sees them), else in the state
        # directory with their prepared slices, so that a restart keeps them.
        if settings.redis_url:
            store: DefinitionStore = RedisDefinitions(settings.redis_url, settings.redis_timeout_ms / 1000)
            slice_files = None
        else:
            store = FileDefinitions(settings.state_dir)
            slice_files = SliceFiles(settings.state_dir, self.label_cache.namespace)
        self.classifiers = Classifiers(
            store,
            self.label_cache,
            metrics,
            encode_images=self.encode_images,
            slice_files=slice_files,
            max_examples_per_label=settings.max_examples_per_label,
            max_example_bytes=int(settings.max_example_mb * 1024 * 1024),
        )

    async def start(self) -> None:
        await self.image_batcher.start()
        await self.text_batcher.start()
        await self.label_cache.connect()
        try:
            await self.classifiers.start()
        except StoreUnavailable as error:  # Redis down at startup: serve anyway; classifiers load on first use
            log.warning("saved classifiers not loaded: %s", error.message)

    async def stop(self) -> None:
        await self.classifiers.close()  # its background work first: the batchers are about to refuse it
        await self.image_batcher.stop()
        await self.text_batcher.stop()
        await self.label_cache.close()
        self.similarity_pool.shutdown(wait=True)  # nothing may launch on the kernel after it is closed
        if self.cuda_similarity is not None:
            self.cuda_similarity.close()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    # --- requests -----------------------------------------------------------------------------------------------

    async def classify(self, request: ClassifyInput, deadline: Deadline) -> Classification:
        labels, templates, saved = request.labels, request.templates, None
        if request.classifier is not None:
            # Before any image work: an unknown or unprepared classifier is answered at once (404, 409).
            saved = await self.classifiers.ready(request.classifier)
            labels, templates = saved.definition.labels, saved.definition.templates

        async def timed_images() -> tuple[list[Any], float]:
            start = time.perf_counter()
            return await self.encode_images.device_parts(request.images, deadline), _elapsed_ms(start)

        async def timed_labels() -> tuple[Prototypes, float]:
            start = time.perf_counter()
            if saved is not None:
                found = await saved.prototypes_for(request.examples_weight, self.model.scoring.logit_scale)
                return found, _elapsed_ms(start)
            matrix = await self.label_cache.label_matrix(labels, templates, deadline)
            return Prototypes(matrix, None), _elapsed_ms(start)

        # TaskGroup: if one half fails (bad image), the other is cancelled rather than left running.
        try:
            async with asyncio.TaskGroup() as group:
                image_task = group.create_task(timed_images())
                label_task = group.create_task(timed_labels())
        except ExceptionGroup as failed:
            raise _first_service_error(failed) from None
        (image_parts, images_ms), (found, labels_ms) = image_task.result(), label_task.result()
        label_matrix = found.matrix
        start = time.perf_counter()
        if self.cuda_similarity is None:
            result = rank_on_host(image_parts[0], label_matrix, self.model.scoring, request.top_k, found.bias)
        elif found.bias is not None:
            # The kernel adds one bias to every label; a classifier's per-label few-shot bias is scored on the host.
            loop = asyncio.get_running_loop()
            host = [await loop.run_in_executor(self.similarity_pool, part.to_host) for part in image_parts]
            result = rank_on_host(np.concatenate(host), label_matrix, self.model.scoring, request.top_k, found.bias)
        else:
            key = (
                f"{self.label_cache.namespace}:classifier:{saved.definition.digest}:{request.examples_weight}"
                if saved is not None
                else self._label_set_key(labels, templates)
            )
            label_set = LabelSet(key, label_matrix)
            rank = partial(self.cuda_similarity.rank, labels=label_set, scoring=self.model.scoring, top_k=request.top_k)
            loop = asyncio.get_running_loop()
            parts = [await loop.run_in_executor(self.similarity_pool, rank, part) for part in image_parts]
            result = parts[0] if len(parts) == 1 else RankedScores(*map(np.concatenate, zip(*parts, strict=True)))
        similarity_ms = _elapsed_ms(start)
        request_context.note_time("labels", labels_ms)  # beside the images' stages, not after them
        request_context.note_time("similarity", similarity_ms)
        return Classification(labels, result, images_ms, labels_ms, similarity_ms, request.classifier)

    def _label_set_key(self, labels: Sequence[str], templates: Sequence[str]) -> str:
        """Names a label matrix by what it is made of, for the GPU's label cache (the vectors' own namespace
        already names the model and precision)."""
        digest = hashlib.blake2b(json.dumps([list(labels), list(templates)]).encode(), digest_size=16).hexdigest()
        return f"{self.label_cache.namespace}:{digest}"


def rank_on_host(
    images: np.ndarray,
    label_matrix: np.ndarray,
    scoring: Scoring,
    top_k: int | None,
    label_bias: np.ndarray | None = None,
) -> RankedScores:
    """The CPU similarity path: every cosine and probability in numpy, then the top k."""
    scores = cosines(images, label_matrix)
    probabilities = scoring.probabilities(scores, label_bias)
    order = ranked(probabilities, top_k)
    return RankedScores(
        order.astype(np.int64),
        np.take_along_axis(probabilities, order, axis=1),
        np.take_along_axis(scores, order, axis=1),
    )
