"""Label vectors, computed once: the memory tier in front of the Redis tier shared by all replicas, and
single-flight so that concurrent requests never encode the same label twice. In front of them all, the whole
matrices of recently used label sets (service/labels/sets.py), so that a warm request does no per-label work.

A label's vector depends only on (model, templates, label): models.templates.ensemble of the text embeddings
of the label put through each template (CLIP §3.1.4). Keys are `{namespace}:{templates digest}:{label digest}`,
and the app's `namespace` (e.g. "clipserve:v1:<manifest hash16>:fp32") carries the model's content hash and
precision, so a new model or precision never reads an old one's vectors.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Sequence
from typing import Protocol

import numpy as np

from models.templates import apply_templates, ensemble
from service.deadline import Deadline
from service.labels.memory import MemoryTier, frozen
from service.labels.redis_tier import RedisTier
from service.labels.sets import LabelSets
from service.labels.single_flight import SingleFlight
from service.metrics import Metrics


class EncodePrompts(Protocol):
    """prompts -> [N, D] float32, L2-normalised rows (the service's TextEncoder: tokenizer + batched text engine);
    `background` work waits for live requests."""

    def __call__(
        self, prompts: list[str], deadline: Deadline, *, background: bool = False
    ) -> Awaitable[np.ndarray]: ...


_DIGEST_CHARS = 16  # 64 bits of sha256: collisions are not a practical concern at label-set sizes.


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:_DIGEST_CHARS]


class LabelCache:
    def __init__(
        self,
        *,
        namespace: str,
        dim: int,
        encode: EncodePrompts,
        metrics: Metrics,
        memory: MemoryTier,
        redis: RedisTier | None = None,
        chunk_prompts: int = 1024,
    ) -> None:
        if chunk_prompts < 1:
            raise ValueError("chunk_prompts must be >= 1")
        self.namespace, self.dim, self._encode, self._metrics = namespace, dim, encode, metrics
        self.memory, self.redis, self.chunk_prompts = memory, redis, chunk_prompts
        # A quarter of the vector tier's bound again: a set's matrix repeats vectors the tier holds as well.
        self.sets = LabelSets(memory.max_bytes // 4)
        self._flight: SingleFlight[str, np.ndarray] = SingleFlight()
        # Background work (preparing saved classifiers) shares computations only with itself: a live request must
        # never wait for prompts queued on the background lane (it would wait behind every live prompt).
        self._background_flight: SingleFlight[str, np.ndarray] = SingleFlight()

    async def connect(self) -> None:
        if self.redis is not None:
            await self.redis.connect()

    async def close(self) -> None:
        await self._flight.close()
        await self._background_flight.close()
        if self.redis is not None:
            await self.redis.close()

    @property
    def redis_available(self) -> bool:
        return self.redis is not None and self.redis.available

    def key(self, label: str, templates: Sequence[str]) -> str:
        return self._key(self._templates_digest(tuple(templates)), label)

    def _templates_digest(self, templates: tuple[str, ...]) -> str:
        # JSON, not a separator join: templates may contain any character (even NUL) and must not collide.
        return _digest(json.dumps(templates, ensure_ascii=False))

    def _key(self, templates_digest: str, label: str) -> str:
        return f"{self.namespace}:{templates_digest}:{_digest(label)}"

    async def label_matrix(
        self, labels: Sequence[str], templates: Sequence[str], deadline: Deadline, *, background: bool = False
    ) -> np.ndarray:
        """[C, D] float32, read-only, row i the vector of labels[i]; raises only what `encode` raises. Misses this call
        encodes itself run as `background` work when asked, sharing computations only with other background
        calls."""
        templates = tuple(templates)
        if not templates:
            raise ValueError("templates must not be empty")  # the mean of no embeddings is undefined
        set_key = (templates, tuple(labels))
        known = self.sets.get(set_key)
        if known is not None:
            self._metrics.cache_lookups.labels("memory", "hit").inc(known.distinct)
            return known.matrix
        tdigest = self._templates_digest(templates)
        keys = [self._key(tdigest, label) for label in labels]
        label_of = dict(zip(keys, labels, strict=True))  # distinct keys, in request order
        found: dict[str, np.ndarray] = {}
        for key in label_of:
            vector = self.memory.get(key)
            if vector is not None:
                found[key] = vector
        missing = [key for key in label_of if key not in found]
        self._metrics.cache_lookups.labels("memory", "hit").inc(len(found))
        self._metrics.cache_lookups.labels("memory", "miss").inc(len(missing))
        if missing:

            async def resolve(owned: list[str]) -> dict[str, np.ndarray]:
                # Runs under this call's deadline even when later calls wait for it too: they share the
                # request timeout, so the work ends at most their arrival gap before they would give up.
                return await self._resolve(templates, {key: label_of[key] for key in owned}, deadline, background)

            flight = self._background_flight if background else self._flight
            found.update(await flight.get(missing, resolve))
        if not keys:
            return np.zeros((0, self.dim), np.float32)
        matrix = np.stack([found[key] for key in keys])
        matrix.flags.writeable = False  # later requests with this label set share it
        self.sets.put(set_key, matrix, len(label_of))
        return matrix

    async def cached_matrix(self, labels: Sequence[str], templates: Sequence[str]) -> np.ndarray | None:
        """The label matrix if every vector is in memory or Redis, else None; never encodes anything."""
        templates = tuple(templates)
        tdigest = self._templates_digest(templates)
        keys = [self._key(tdigest, label) for label in labels]
        found = {key: vector for key in keys if (vector := self.memory.get(key)) is not None}
        missing = [key for key in dict.fromkeys(keys) if key not in found]
        if missing and self.redis is not None:
            found.update(await self.redis.get_many(missing))
        if len(found) < len(set(keys)):
            return None
        return np.stack([found[key] for key in keys]) if keys else np.zeros((0, self.dim), np.float32)

    async def _resolve(
        self, templates: tuple[str, ...], owned: dict[str, str], deadline: Deadline, background: bool
    ) -> dict[str, np.ndarray]:
        """Vectors for `owned` (key -> label) from Redis, or encoded; every one lands in the memory tier."""
        vectors = await self.redis.get_many(list(owned)) if self.redis is not None else {}
        for key, vector in vectors.items():
            self.memory.put(key, vector)
        missing = [key for key in owned if key not in vectors]
        # Chunk by chunk, each cached as soon as it is encoded: work cut short (the deadline passed, everyone
        # waiting went away, the server stopped) keeps what it finished, so a retry only encodes the rest.
        # Submitting the chunks one after another also lets live requests' prompts in between them.
        step = max(1, self.chunk_prompts // len(templates))
        for start in range(0, len(missing), step):
            chunk = missing[start : start + step]
            encoded = await self._encode_labels(templates, [owned[key] for key in chunk], deadline, background)
            fresh = dict(zip(chunk, encoded, strict=True))
            for key, vector in fresh.items():
                self.memory.put(key, vector)
            if self.redis is not None:
                # Written before going on: one pipelined write is small next to the chunk's encoding, and what is
                # in Redis is what another replica, or this one after a restart, does not encode again.
                await self.redis.set_many(fresh)
            vectors.update(fresh)
        return vectors

    async def _encode_labels(
        self, templates: tuple[str, ...], labels: list[str], deadline: Deadline, background: bool
    ) -> list[np.ndarray]:
        prompts = [prompt for label in labels for prompt in apply_templates(templates, label)]
        embeddings = np.asarray(await self._encode(prompts, deadline, background=background), dtype=np.float32)
        if embeddings.shape != (len(prompts), self.dim):
            raise ValueError(f"encode returned shape {embeddings.shape}, expected {(len(prompts), self.dim)}")
        return [frozen(row) for row in ensemble(embeddings, len(labels))]
