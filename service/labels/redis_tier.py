"""The shared tier of the label cache: label vectors in Redis, read and written in one round trip each.

Redis is an optimisation, never a dependency. The tier is a circuit breaker: the first failed call (down,
refused, timed out) opens it, counted in `redis_errors{operation}`; while it is open the request path does not
touch Redis at all (reads are misses, writes are skipped), and a background probe PINGs Redis every
`probe_interval_s` and closes it as soon as Redis answers. A dead or hung Redis thus costs at most one client
timeout, and only to the requests that were already waiting on it; one that comes back is used again within
about one probe interval, whether or not requests arrive meanwhile.

A value that is not a label vector (wrong length, not finite, not unit length) is a miss: the label is encoded
again and the write overwrites it.
"""

from __future__ import annotations

import asyncio
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

# Label vectors are L2-normalised (models.templates.ensemble) and stored as float32, so a genuine one is unit
# length to ~1e-7; garbage of the right byte length (other dtypes, byte orders, random bytes) is not.
_UNIT_TOLERANCE = 1e-3
# Bounds the memory of which malformed keys were logged already; past it, a key may be logged once more.
_MALFORMED_LOGGED_MAX = 10_000


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
        probe_interval_s: float = 0.5,
    ) -> None:
        if probe_interval_s <= 0:
            raise ValueError("probe_interval_s must be > 0")
        self.dim, self._metrics, self._ttl_s = dim, metrics, ttl_s
        # The shortest time Redis is left alone after the breaker opens: it doubles when Redis fails again right
        # after a probe let it back in (it answers PING but not the real calls), so such a Redis costs a timeout
        # less and less often; the next successful call resets it.
        self.backoff = backoff or Backoff()
        self.probe_interval_s = probe_interval_s
        self._open = False  # the breaker: True while the request path leaves Redis alone
        self._probe: asyncio.Task[None] | None = None
        self._closed = False
        self._malformed_logged: set[str] = set()
        # Retries are explicit: redis-py's defaults differ between versions and constructors (Redis() retries 10
        # times, up to 1 s apart), which would stall requests on a dead Redis. The breaker handles outages; one
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
        """Whether the request path may use Redis now (the breaker is closed)."""
        return not self._open

    @property
    def probing(self) -> bool:
        """Whether the background probe is running: while the breaker is open, until the tier is closed."""
        return self._probe is not None and not self._probe.done()

    async def connect(self) -> None:
        """Pings once, so an unreachable Redis is logged at startup (and probed from then on); never raises."""
        try:
            await self.client.ping()
        except _REDIS_FAILURES as error:
            self._failed("connect", error)
            return
        self.backoff.succeeded()

    async def close(self) -> None:
        self._closed = True  # a call still failing during shutdown must not start a new probe
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.wait([self._probe])  # unlike awaiting it, never swallows a cancellation of close()
            self._probe = None
        with contextlib.suppress(*_REDIS_FAILURES):  # shutting down: a dead Redis has nothing left to lose
            await self.client.aclose()

    async def get_many(self, keys: list[str]) -> dict[str, np.ndarray]:
        """The vectors Redis has for `keys` (one MGET); anything else under a key is a miss ("malformed")."""
        if not keys or self._open:
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
            elif (vector := self._vector(key, raw)) is not None:
                vectors[key], result = vector, "hit"
            else:
                result = "malformed"
            self._metrics.cache_lookups.labels("redis", result).inc()
        return vectors

    async def set_many(self, vectors: dict[str, np.ndarray]) -> None:
        """Writes every vector in one pipeline (with the TTL when one is set)."""
        if not vectors or self._open:
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

    def _vector(self, key: str, raw: object) -> np.ndarray | None:
        """The label vector stored as `raw`, or None (logged once per key) when it cannot be one."""
        problem = None
        if not isinstance(raw, bytes) or len(raw) != self.dim * 4:
            problem = f"{len(raw) if isinstance(raw, bytes) else type(raw).__name__} bytes, expected {self.dim * 4}"
        else:
            vector = np.frombuffer(raw, dtype="<f4")
            with np.errstate(all="ignore"):  # garbage may hold signalling NaNs and infinities: judged just below
                norm = float(np.linalg.norm(vector.astype(np.float64)))
            if not np.isfinite(norm) or abs(norm - 1) > _UNIT_TOLERANCE:
                problem = f"L2 norm {norm:.6g}, expected 1"
            else:
                return frozen(vector)
        # Another writer or version, or corruption, left something else here: the label is encoded again and the
        # write overwrites it. Once per key: a writer that keeps putting it back must not flood the log.
        if key not in self._malformed_logged:
            if len(self._malformed_logged) >= _MALFORMED_LOGGED_MAX:
                self._malformed_logged.clear()
            self._malformed_logged.add(key)
            log.warning("redis value under %s is not a label vector (%s); recomputing and overwriting it", key, problem)
        return None

    def _failed(self, operation: str, error: BaseException) -> None:
        self._metrics.redis_errors.labels(operation).inc()
        if self._open:
            return  # a call that was in flight when Redis went away: this outage is already being handled
        self._open = True
        wait_s = self.backoff.failed()
        log.warning(
            "redis %s failed (%s); leaving Redis alone until it answers a probe (every %.3g s, from %.3g s on)",
            operation,
            error,
            self.probe_interval_s,
            wait_s,
        )
        if not self._closed and (self._probe is None or self._probe.done()):
            self._probe = asyncio.get_running_loop().create_task(self._run_probe(), name="clipserve-redis-probe")

    async def _run_probe(self) -> None:
        """PINGs Redis while the breaker is open, off the request path, and closes the breaker when it answers."""
        while self._open:
            await asyncio.sleep(self.probe_interval_s)
            if not self.backoff.open:
                continue  # inside the shortest stay-away after the failure
            try:
                await self.client.ping()
            except _REDIS_FAILURES as error:
                self._metrics.redis_errors.labels("probe").inc()
                log.debug("redis probe failed: %s", error)
                continue
            except Exception:
                # Not a Redis failure but a bug: a probe that died would leave the cache without Redis for good.
                log.exception("redis probe failed unexpectedly; probing on")
                continue
            self._open = False
            log.info("redis answers again; using it for label vectors")
