"""The shared tier of the label cache: label vectors in Redis, read and written in one round trip each.

Redis is an optimisation, never a dependency: when it is down or slow, calls return nothing (a miss) or do
nothing (a write), the failure is counted in `redis_errors{operation}`, and the backoff keeps Redis out of
the request path until it has had time to recover, so a dead Redis does not add latency to every request.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from service.labels.backoff import Backoff
from service.labels.memory import frozen
from service.metrics import Metrics

log = logging.getLogger("clipserve.label_cache")

# redis-py's ConnectionError/TimeoutError are RedisErrors; socket failures can surface as OSError (which
# includes the builtin TimeoutError).
_REDIS_FAILURES = (RedisError, OSError)


class RedisTier:
    def __init__(
        self,
        url: str,
        *,
        dim: int,
        metrics: Metrics,
        timeout_s: float = 0.1,
        ttl_s: int | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.dim, self._metrics, self._ttl_s = dim, metrics, ttl_s
        self.backoff = backoff or Backoff()
        # Retries are explicit: redis-py's defaults differ between versions and constructors (Redis() retries 10
        # times, up to 1 s apart), which would stall requests on a dead Redis. The backoff handles outages; one
        # immediate retry on a connection error covers a pooled connection the server dropped (a restart), and a
        # timeout is never retried, so a slow Redis costs one timeout per request at most.
        self.client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )

    @property
    def available(self) -> bool:
        return self.backoff.open

    async def connect(self) -> None:
        """Pings once, so an unreachable Redis is logged at startup; never raises."""
        try:
            await self.client.ping()
        except _REDIS_FAILURES as error:
            self._failed("connect", error)  # the client stays: Redis is tried again after the backoff
            return
        self.backoff.succeeded()

    async def close(self) -> None:
        with contextlib.suppress(*_REDIS_FAILURES):  # shutting down: a dead Redis has nothing left to lose
            await self.client.aclose()

    async def get_many(self, keys: list[str]) -> dict[str, np.ndarray]:
        """The vectors Redis has for `keys` (one MGET); a value of the wrong size counts as malformed."""
        if not keys or not self.available:
            return {}
        try:
            values = await self.client.mget(keys)
        except _REDIS_FAILURES as error:
            self._failed("mget", error)
            return {}
        self.backoff.succeeded()
        vectors: dict[str, np.ndarray] = {}
        for key, raw in zip(keys, values, strict=True):
            if raw is None:
                result = "miss"
            elif isinstance(raw, bytes) and len(raw) == self.dim * 4:
                vectors[key], result = frozen(np.frombuffer(raw, dtype="<f4")), "hit"
            else:
                # Another writer or version left something else here: recompute, and the write overwrites it.
                result = "malformed"
            self._metrics.cache_lookups.labels("redis", result).inc()
        return vectors

    async def set_many(self, vectors: dict[str, np.ndarray]) -> None:
        """Writes every vector in one pipeline (with the TTL when one is set)."""
        if not vectors or not self.available:
            return
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for key, vector in vectors.items():
                    pipe.set(key, vector.astype("<f4").tobytes(), ex=self._ttl_s)
                await pipe.execute()
        except _REDIS_FAILURES as error:
            self._failed("set", error)
            return
        self.backoff.succeeded()

    def _failed(self, operation: str, error: BaseException) -> None:
        self._metrics.redis_errors.labels(operation).inc()
        wait_s = self.backoff.failed()
        log.warning("redis %s failed (%s); skipping Redis for %.3g s", operation, error, wait_s)
