"""Label vectors, computed once: an in-process LRU in front of a Redis cache shared by all replicas.

A label's vector depends only on (model, templates, label): the L2-renormalised mean of the text embeddings
of the label put through each template (CLIP §3.1.4). Keys are `{namespace}:{templates digest}:{label digest}`,
and the app's `namespace` (e.g. "clipserve:v1:<manifest hash16>:fp32") carries the model's content hash and
precision, so keys are versioned by it: a new model or precision never reads an old one's vectors.

Redis is an optimisation, never a dependency: when it is unset, down or slow, answers come from memory or
fresh computation, the failure is counted in `redis_errors{operation}`, and Redis is left alone for a backoff
that doubles (0.5 s .. 30 s) until a call succeeds again, so a dead Redis does not add latency to every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from models.templates import apply_templates, ensemble
from service.metrics import Metrics

log = logging.getLogger("clipserve.label_cache")

# prompts -> [N, D] float32, L2-normalised rows (the app wires it to tokenizer + batched text engine).
EncodePrompts = Callable[[list[str]], Awaitable[np.ndarray]]

BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
# redis-py's ConnectionError/TimeoutError are RedisErrors; socket failures can surface as OSError (which
# includes the builtin TimeoutError).
_REDIS_FAILURES = (RedisError, OSError)
_DIGEST_CHARS = 16  # 64 bits of sha256: collisions are not a practical concern at label-set sizes.


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:_DIGEST_CHARS]


def _retrieve(future: asyncio.Future[Any]) -> None:
    # Marks a failure as seen when every caller waiting on it was cancelled (no "never retrieved" noise).
    if not future.cancelled():
        future.exception()


class LabelCache:
    def __init__(
        self,
        *,
        namespace: str,
        dim: int,
        encode: EncodePrompts,
        metrics: Metrics,
        memory_bytes: int = 64 << 20,
        redis_url: str | None = None,
        redis_timeout_s: float = 0.1,
        ttl_s: int | None = None,
        backoff_initial_s: float | None = None,
        backoff_max_s: float | None = None,
    ) -> None:
        # Read at construction (not bound as defaults) so a test can shorten the module-wide backoff.
        backoff_initial_s = BACKOFF_INITIAL_S if backoff_initial_s is None else backoff_initial_s
        backoff_max_s = BACKOFF_MAX_S if backoff_max_s is None else backoff_max_s
        self.namespace, self.dim, self._encode, self._metrics = namespace, dim, encode, metrics
        self._memory_bytes, self._ttl_s = memory_bytes, ttl_s
        self._redis_url, self._timeout_s = redis_url, redis_timeout_s
        self._backoff_initial_s, self._backoff_max_s = backoff_initial_s, backoff_max_s
        self._lru: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lru_used = 0
        self._redis: aioredis.Redis | None = None
        self._skip_redis_until = 0.0  # time.monotonic() before which Redis is not tried
        self._next_backoff_s = backoff_initial_s
        self._inflight: dict[str, asyncio.Future[np.ndarray]] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # strong references: the loop keeps only weak ones
        # Who still wants each in-flight key, and which task computes which keys: a computation that nobody
        # waits for any more (its requests timed out or disconnected) is cancelled instead of occupying the
        # text engine for everyone else.
        self._waiters: dict[str, int] = {}
        self._task_keys: dict[asyncio.Task[None], list[str]] = {}
        self.encode_calls = 0
        self.prompts_encoded = 0

    async def connect(self) -> None:
        if self._redis_url is None or self._redis is not None:
            return
        # Retries are explicit: redis-py's defaults differ between versions and constructors (Redis() retries 10
        # times, up to 1 s apart), which would stall requests on a dead Redis. Our own backoff handles outages;
        # one immediate retry on a connection error covers a pooled connection the server dropped (a restart),
        # and a timeout is never retried, so a slow Redis costs one timeout per request at most.
        self._redis = aioredis.Redis.from_url(
            self._redis_url,
            socket_timeout=self._timeout_s,
            socket_connect_timeout=self._timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        try:
            await self._redis.ping()
            self._redis_succeeded()
        except _REDIS_FAILURES as error:
            self._redis_failed("connect", error)  # keep the client: it is retried after the backoff

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        client, self._redis = self._redis, None
        if client is not None:
            with contextlib.suppress(*_REDIS_FAILURES):  # shutting down: a dead Redis has nothing left to lose
                await client.aclose()

    @property
    def redis_available(self) -> bool:
        return self._redis is not None and time.monotonic() >= self._skip_redis_until

    def key(self, label: str, templates: Sequence[str]) -> str:
        return self._key(self._templates_digest(tuple(templates)), label)

    def _templates_digest(self, templates: tuple[str, ...]) -> str:
        # JSON, not a separator join: templates may contain any character (even NUL) and must not collide.
        return _digest(json.dumps(templates, ensure_ascii=False))

    def _key(self, templates_digest: str, label: str) -> str:
        return f"{self.namespace}:{templates_digest}:{_digest(label)}"

    async def label_matrix(self, labels: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        """[C, D] float32, row i the vector of labels[i]; raises only what `encode` raises."""
        templates = tuple(templates)
        if not templates:
            raise ValueError("templates must not be empty")  # the mean of no embeddings is undefined
        tdigest = self._templates_digest(templates)
        keys = [self._key(tdigest, label) for label in labels]
        found: dict[str, np.ndarray] = {}
        waiting: dict[str, asyncio.Future[np.ndarray]] = {}
        owned: dict[str, str] = {}  # key -> label this call resolves for everyone
        for key, label in zip(keys, labels, strict=True):
            if key in found or key in waiting:
                continue
            vector = self._memory_get(key)
            self._metrics.cache_lookups.labels("memory", "miss" if vector is None else "hit").inc()
            if vector is not None:
                found[key] = vector
                continue
            # Single-flight: no await between this check and the registration, so one owner per key.
            future = self._inflight.get(key)
            if future is None:
                future = asyncio.get_running_loop().create_future()
                future.add_done_callback(_retrieve)
                self._inflight[key] = future
                owned[key] = label
            waiting[key] = future
        if owned:
            # The work runs in its own task, so a cancelled caller does not cancel it for the others waiting.
            task = asyncio.create_task(self._resolve(templates, owned))
            self._tasks.add(task)
            self._task_keys[task] = list(owned)
            task.add_done_callback(self._forget_task)
        if waiting:
            gathered = asyncio.gather(*waiting.values())
            gathered.add_done_callback(_retrieve)
            for key in waiting:
                self._waiters[key] = self._waiters.get(key, 0) + 1
            try:
                found.update(zip(waiting, await asyncio.shield(gathered), strict=True))
            finally:
                self._stop_waiting(list(waiting))
        if not keys:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([found[key] for key in keys])

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._task_keys.pop(task, None)

    def _stop_waiting(self, keys: list[str]) -> None:
        for key in keys:
            remaining = self._waiters.get(key, 1) - 1
            if remaining > 0:
                self._waiters[key] = remaining
            else:
                self._waiters.pop(key, None)
        for task, task_keys in list(self._task_keys.items()):
            if not task.done() and not any(self._waiters.get(key, 0) for key in task_keys):
                task.cancel()

    async def _resolve(self, templates: tuple[str, ...], owned: dict[str, str]) -> None:
        futures = {key: self._inflight[key] for key in owned}
        try:
            vectors = await self._redis_get(list(owned))
            missing = [key for key in owned if key not in vectors]
            computed = await self._compute(templates, [owned[key] for key in missing]) if missing else []
            fresh = dict(zip(missing, computed, strict=True))
            vectors.update(fresh)
        except BaseException as error:
            for key, future in futures.items():
                self._inflight.pop(key, None)  # not poisoned: the next call for this key starts afresh
                if future.done():
                    continue
                if isinstance(error, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(error)
            if not isinstance(error, Exception):
                raise
            return
        for key, future in futures.items():  # no await in this loop: memory, results and in-flight agree
            self._memory_put(key, vectors[key])
            self._inflight.pop(key, None)
            if not future.done():
                future.set_result(vectors[key])
        if fresh:
            await self._redis_set(fresh)  # after the waiters are released: they need not wait for the write

    async def _compute(self, templates: tuple[str, ...], labels: list[str]) -> list[np.ndarray]:
        prompts = [prompt for label in labels for prompt in apply_templates(templates, label)]
        self.encode_calls += 1
        self.prompts_encoded += len(prompts)
        embeddings = np.asarray(await self._encode(prompts), dtype=np.float32)
        if embeddings.shape != (len(prompts), self.dim):
            raise ValueError(f"encode returned shape {embeddings.shape}, expected {(len(prompts), self.dim)}")
        return [self._frozen(row) for row in ensemble(embeddings, len(labels))]

    def _frozen(self, vector: np.ndarray) -> np.ndarray:
        # Shared by every caller through the LRU: read-only so no caller can corrupt another's answer.
        vector = np.ascontiguousarray(vector, dtype=np.float32)
        vector.flags.writeable = False
        return vector

    def _memory_get(self, key: str) -> np.ndarray | None:
        vector = self._lru.get(key)
        if vector is not None:
            self._lru.move_to_end(key)
        return vector

    def _memory_put(self, key: str, vector: np.ndarray) -> None:
        size = vector.nbytes + len(key)
        if size > self._memory_bytes or key in self._lru:
            return
        self._lru[key] = vector
        self._lru_used += size
        while self._lru_used > self._memory_bytes:
            old_key, old = self._lru.popitem(last=False)
            self._lru_used -= old.nbytes + len(old_key)

    async def _redis_get(self, keys: list[str]) -> dict[str, np.ndarray]:
        if self._redis is None or not self.redis_available:
            return {}
        try:
            values = await self._redis.mget(keys)
        except _REDIS_FAILURES as error:
            self._redis_failed("mget", error)
            return {}
        self._redis_succeeded()
        vectors: dict[str, np.ndarray] = {}
        for key, raw in zip(keys, values, strict=True):
            if raw is None:
                result = "miss"
            elif isinstance(raw, bytes) and len(raw) == self.dim * 4:
                vectors[key], result = self._frozen(np.frombuffer(raw, dtype="<f4")), "hit"
            else:
                # Another writer or version left something else here: recompute, and the write overwrites it.
                result = "malformed"
            self._metrics.cache_lookups.labels("redis", result).inc()
        return vectors

    async def _redis_set(self, vectors: dict[str, np.ndarray]) -> None:
        if self._redis is None or not self.redis_available:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, vector in vectors.items():
                    pipe.set(key, vector.astype("<f4").tobytes(), ex=self._ttl_s)
                await pipe.execute()
        except _REDIS_FAILURES as error:
            self._redis_failed("set", error)
            return
        self._redis_succeeded()

    def _redis_failed(self, operation: str, error: BaseException) -> None:
        self._metrics.redis_errors.labels(operation).inc()
        log.warning("redis %s failed (%s); skipping Redis for %.3g s", operation, error, self._next_backoff_s)
        self._skip_redis_until = time.monotonic() + self._next_backoff_s
        self._next_backoff_s = min(self._next_backoff_s * 2, self._backoff_max_s)

    def _redis_succeeded(self) -> None:
        self._next_backoff_s = self._backoff_initial_s
