"""LabelCache against a real redis-server (its own process, see redis_server.py): tiers, single-flight, outages.

The encoder is a deterministic fake standing in for tokenizer + text engine: each prompt maps to a unit vector
seeded by a hash of its text, so expected label vectors can be computed directly with numpy.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from models.templates import SIMPLE_7
from service.deadline import Deadline
from service.labels.backoff import Backoff
from service.labels.cache import LabelCache
from service.labels.memory import MemoryTier
from service.labels.redis_tier import RedisTier
from service.metrics import Metrics
from tests.service.conftest import wait_until
from tests.service.redis_server import RedisServer, free_port

DIM = 16
TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "{}")
DEADLINE = Deadline.after(3600)  # these tests are about the cache, not about running out of time


def prompt_vector(text: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


def expected(label: str, templates: tuple[str, ...] = TEMPLATES) -> np.ndarray:
    mean = np.mean([prompt_vector(t.format(label)) for t in templates], axis=0)
    return (mean / np.linalg.norm(mean)).astype(np.float32)


class FakeEncoder:
    """Stands in for tokenizer + batched text engine; records every call."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.delay_s = 0.0
        self.error: Exception | None = None
        self.fail_call: int | None = None  # the index of the one call that raises `error`
        self.background: list[bool] = []  # per call

    async def __call__(self, prompts: list[str], deadline: Deadline, *, background: bool = False) -> np.ndarray:
        self.calls.append(list(prompts))
        self.background.append(background)
        await asyncio.sleep(self.delay_s)  # a real engine yields to the loop; lets concurrent callers pile up
        if self.error is not None and self.fail_call in (None, len(self.calls) - 1):
            raise self.error
        return np.stack([prompt_vector(p) for p in prompts])


def lookups(metrics: Metrics, tier: str, result: str) -> float:
    return metrics.value("clipserve_label_cache_total", {"tier": tier, "result": result})


def redis_errors(metrics: Metrics, operation: str | None = None) -> float:
    """Failed Redis calls; without `operation`, those of the request path and startup (not the probe's)."""
    operations = [operation] if operation else ["mget", "set", "connect"]
    return sum(metrics.value("clipserve_redis_errors_total", {"operation": op}) for op in operations)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def namespace() -> str:
    # Like the app's: model content hash + precision; unique per test so tests sharing one server never meet.
    return f"clipserve:v1:{uuid.uuid4().hex[:16]}:fp32"


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


MakeCache = Callable[..., Awaitable[tuple[LabelCache, FakeEncoder, Metrics]]]


class ManualClock:
    """The Redis backoff's clock, moved by hand instead of sleeping: on a loaded 2-core CI machine a wall-clock
    backoff can run out between two calls."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def manual_clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def make_cache(namespace: str) -> AsyncIterator[MakeCache]:
    caches: list[LabelCache] = []

    async def make(
        *,
        redis_url: str | None = None,
        redis_timeout_s: float = 0.1,
        ttl_s: int | None = None,
        memory_bytes: int = 64 << 20,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        clock: Callable[[], float] | None = None,
        probe_interval_s: float = 0.5,
        **kwargs: Any,
    ) -> tuple[LabelCache, FakeEncoder, Metrics]:
        """The cache as the pipeline assembles it, from the parts the keywords configure."""
        encoder, metrics = FakeEncoder(), Metrics()
        redis = None
        if redis_url is not None:
            backoff = Backoff(backoff_initial_s, backoff_max_s, clock or ManualClock().monotonic)
            redis = RedisTier(
                redis_url,
                dim=DIM,
                metrics=metrics,
                timeout_s=redis_timeout_s,
                ttl_s=ttl_s,
                backoff=backoff,
                probe_interval_s=probe_interval_s,
            )
        options: dict[str, Any] = {"namespace": namespace, "dim": DIM, "encode": encoder, "metrics": metrics}
        cache = LabelCache(**(options | kwargs), memory=MemoryTier(memory_bytes), redis=redis)
        await cache.connect()
        caches.append(cache)
        return cache, encoder, metrics

    yield make
    for cache in caches:
        await cache.close()


async def test_rows_are_renormalised_template_means_in_label_order(make_cache: MakeCache) -> None:
    cache, _, _ = await make_cache()
    labels = ["cat", "dog", "cat", "κόκκινο λεωφορείο 🚌", "x" * 5000]
    matrix = await cache.label_matrix(labels, TEMPLATES, DEADLINE)
    assert matrix.shape == (5, DIM) and matrix.dtype == np.float32
    np.testing.assert_allclose(matrix, np.stack([expected(label) for label in labels]), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="read-only"):  # requests with this label set share it: nobody may change it
        matrix[0] = 0
    assert await cache.label_matrix(list(labels), TEMPLATES, DEADLINE) is matrix  # the set's matrix, kept whole
    np.testing.assert_allclose((await cache.label_matrix(["cat"], TEMPLATES, DEADLINE))[0], expected("cat"), atol=1e-6)
    assert (await cache.label_matrix([], TEMPLATES, DEADLINE)).shape == (0, DIM)
    with pytest.raises(ValueError, match="templates"):
        await cache.label_matrix(["cat"], [], DEADLINE)


def memory_lookups(metrics: Metrics, result: str) -> float:
    return metrics.value("clipserve_label_cache_total", {"tier": "memory", "result": result})


async def test_a_label_set_seen_before_is_one_kept_matrix_counted_per_distinct_label(make_cache: MakeCache) -> None:
    cache, encoder, metrics = await make_cache()
    labels = [f"label {i}" for i in range(50)] + ["label 0"]
    first = await cache.label_matrix(labels, TEMPLATES, DEADLINE)
    assert (memory_lookups(metrics, "miss"), memory_lookups(metrics, "hit")) == (50, 0)
    cache.memory = MemoryTier(cache.memory.max_bytes)  # the per-label tier forgets: the set's matrix still answers
    again = await cache.label_matrix([str(label) for label in labels], list(TEMPLATES), DEADLINE)  # equal, not same
    assert again is first and len(encoder.calls) == 1
    assert (memory_lookups(metrics, "miss"), memory_lookups(metrics, "hit")) == (50, 50)
    # Another order, a subset or other templates are other sets, built from the per-label tiers, rows in order.
    reordered = await cache.label_matrix(labels[::-1], TEMPLATES, DEADLINE)
    np.testing.assert_array_equal(reordered, first[::-1])
    other = await cache.label_matrix(labels[:2], TEMPLATES[:1], DEADLINE)
    np.testing.assert_allclose(other, np.stack([expected(label, TEMPLATES[:1]) for label in labels[:2]]), atol=1e-6)


async def test_label_sets_stay_within_a_quarter_of_the_memory_bound(make_cache: MakeCache) -> None:
    row = DIM * 4
    cache, encoder, _ = await make_cache(memory_bytes=400 * row)  # sets: 100 rows' worth
    big = [f"big {i}" for i in range(120)]
    matrix = await cache.label_matrix(big, TEMPLATES, DEADLINE)
    assert await cache.label_matrix(big, TEMPLATES, DEADLINE) is not matrix  # too big to keep whole: rebuilt
    small = [[f"small {s} {i}" for i in range(40)] for s in range(3)]
    kept = [await cache.label_matrix(labels, TEMPLATES, DEADLINE) for labels in small]
    assert await cache.label_matrix(small[2], TEMPLATES, DEADLINE) is kept[2]
    assert await cache.label_matrix(small[0], TEMPLATES, DEADLINE) is not kept[0]  # the oldest made room
    assert len(encoder.calls) == 4  # and every vector still came from the per-label tier


async def test_keys_are_versioned_by_namespace_templates_and_label(make_cache: MakeCache) -> None:
    cache, _, _ = await make_cache()
    key = cache.key("cat", TEMPLATES)
    assert key.startswith(cache.namespace + ":")
    assert key != cache.key("dog", TEMPLATES)
    assert key != cache.key("cat", TEMPLATES[::-1])
    assert key != cache.key("cat", SIMPLE_7)
    assert len(cache.key("ü" * 10_000, TEMPLATES)) == len(key)  # digests: long labels make short keys


async def test_memory_then_redis_then_another_namespace_misses(
    make_cache: MakeCache, raw: aioredis.Redis, redis_server: RedisServer
) -> None:
    labels = ["cat", "dog", "bird"]
    first, encoder, metrics = await make_cache(redis_url=redis_server.url)
    assert first.redis_available
    vectors = await first.label_matrix(labels, TEMPLATES, DEADLINE)
    assert len(encoder.calls) == 1 and len(encoder.calls[0]) == 9
    assert lookups(metrics, "memory", "miss") == 3 and lookups(metrics, "redis", "miss") == 3
    assert await raw.exists(*(first.key(label, TEMPLATES) for label in labels)) == 3

    again = await first.label_matrix(labels, TEMPLATES, DEADLINE)
    assert len(encoder.calls) == 1 and lookups(metrics, "memory", "hit") == 3
    np.testing.assert_array_equal(again, vectors)

    # A second replica on the same Redis and model: all Redis hits, nothing encoded, the same vectors.
    second, encoder2, metrics2 = await make_cache(redis_url=redis_server.url)
    np.testing.assert_array_equal(await second.label_matrix(labels, TEMPLATES, DEADLINE), vectors)
    assert encoder2.calls == [] and lookups(metrics2, "redis", "hit") == 3
    assert encoder2.calls == [] and len(encoder.calls) == 1 and sum(map(len, encoder.calls)) == 9

    # Another model (another content hash in the namespace) never reads these vectors.
    other, encoder3, metrics3 = await make_cache(redis_url=redis_server.url, namespace="clipserve:v1:0000:fp32")
    await other.label_matrix(labels, TEMPLATES, DEADLINE)
    assert len(encoder3.calls) == 1 and lookups(metrics3, "redis", "hit") == 0
    assert redis_errors(metrics) == redis_errors(metrics2) == redis_errors(metrics3) == 0


async def test_a_thousand_labels_are_one_encode_call_one_mget_and_one_pipeline(
    make_cache: MakeCache, redis_server: RedisServer, raw: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, encoder, _ = await make_cache(redis_url=redis_server.url, chunk_prompts=7000)
    # Commands sent one by one go through Redis.execute_command; a pipeline's commands do not.
    assert cache.redis is not None
    client = cache.redis.client
    single_commands: list[str] = []
    send = client.execute_command

    async def spy(*args: Any, **options: Any) -> Any:
        single_commands.append(str(args[0]))
        return await send(*args, **options)

    monkeypatch.setattr(client, "execute_command", spy)
    labels = [f"label {i}" for i in range(1000)]
    matrix = await cache.label_matrix(labels, SIMPLE_7, DEADLINE)
    assert len(encoder.calls) == 1 and len(encoder.calls[0]) == 7000
    assert single_commands == ["MGET"]  # one lookup for all misses; the 1,000 SETs went in one pipeline
    assert await raw.exists(*(cache.key(label, SIMPLE_7) for label in labels)) == 1000
    np.testing.assert_allclose(
        matrix[[0, 999]], [expected(labels[0], SIMPLE_7), expected(labels[999], SIMPLE_7)], atol=1e-6
    )

    np.testing.assert_array_equal(await cache.label_matrix(labels, SIMPLE_7, DEADLINE), matrix)
    assert len(encoder.calls) == 1 and single_commands == ["MGET"]  # memory hits: neither encoder nor Redis


async def test_concurrent_calls_compute_each_label_once(make_cache: MakeCache, redis_server: RedisServer) -> None:
    cache, encoder, _ = await make_cache(redis_url=redis_server.url)
    encoder.delay_s = 0.05
    labels = ["apple", "pear", "plum"]
    results = await asyncio.gather(*(cache.label_matrix(labels, TEMPLATES, DEADLINE) for _ in range(10)))
    assert len(encoder.calls) == 1
    for result in results:
        np.testing.assert_array_equal(result, results[0])

    # Overlapping requests: the second encodes only what the first is not already computing.
    await asyncio.gather(
        cache.label_matrix(["a", "b"], TEMPLATES, DEADLINE), cache.label_matrix(["b", "c"], TEMPLATES, DEADLINE)
    )
    assert sorted(p for call in encoder.calls[1:] for p in call) == sorted(
        t.format(x) for x in "abc" for t in TEMPLATES
    )


async def test_a_cancelled_caller_does_not_cancel_the_others(make_cache: MakeCache) -> None:
    cache, encoder, _ = await make_cache()
    encoder.delay_s = 0.05
    owner = asyncio.create_task(cache.label_matrix(["owl"], TEMPLATES, DEADLINE))
    await asyncio.sleep(0)  # the owner registers the computation
    waiter = asyncio.create_task(cache.label_matrix(["owl"], TEMPLATES, DEADLINE))
    await asyncio.sleep(0.01)
    owner.cancel()
    np.testing.assert_allclose((await waiter)[0], expected("owl"), atol=1e-6)
    assert len(encoder.calls) == 1


async def test_a_malformed_redis_value_is_recomputed_and_overwritten(
    make_cache: MakeCache, redis_server: RedisServer, raw: aioredis.Redis
) -> None:
    cache, encoder, metrics = await make_cache(redis_url=redis_server.url)
    key = cache.key("zebra", TEMPLATES)
    await raw.set(key, b"\x00" * (DIM * 4 - 1))
    matrix = await cache.label_matrix(["zebra"], TEMPLATES, DEADLINE)
    np.testing.assert_allclose(matrix[0], expected("zebra"), atol=1e-6)
    assert len(encoder.calls) == 1 and lookups(metrics, "redis", "malformed") == 1
    stored = await raw.get(key)
    assert isinstance(stored, bytes) and len(stored) == DIM * 4
    np.testing.assert_allclose(np.frombuffer(stored, "<f4"), expected("zebra"), atol=1e-6)


async def test_memory_is_bounded_by_bytes_and_evicted_entries_come_from_redis(
    make_cache: MakeCache, redis_server: RedisServer
) -> None:
    probe, _, _ = await make_cache()
    entry_bytes = DIM * 4 + len(probe.key("l0", TEMPLATES))
    cache, encoder, metrics = await make_cache(redis_url=redis_server.url, memory_bytes=3 * entry_bytes)
    for i in range(5):
        await cache.label_matrix([f"l{i}"], TEMPLATES, DEADLINE)
    assert len(encoder.calls) == 5

    await cache.label_matrix(["l4", "l3", "l2"], TEMPLATES, DEADLINE)  # the three newest fit
    assert lookups(metrics, "memory", "hit") == 3
    np.testing.assert_allclose((await cache.label_matrix(["l0"], TEMPLATES, DEADLINE))[0], expected("l0"), atol=1e-6)
    assert lookups(metrics, "memory", "hit") == 3 and lookups(metrics, "redis", "hit") == 1  # evicted -> Redis
    assert len(encoder.calls) == 5

    # memory_bytes=0 disables the memory tier: every repeat is a Redis hit.
    off, encoder_off, metrics_off = await make_cache(redis_url=redis_server.url, memory_bytes=0)
    await off.label_matrix(["l9"], TEMPLATES, DEADLINE)
    await off.label_matrix(["l9"], TEMPLATES, DEADLINE)
    assert len(encoder_off.calls) == 1 and lookups(metrics_off, "memory", "hit") == 0
    assert lookups(metrics_off, "redis", "hit") == 1


async def test_ttl_is_set_only_when_asked(
    make_cache: MakeCache, redis_server: RedisServer, raw: aioredis.Redis
) -> None:
    with_ttl, _, _ = await make_cache(redis_url=redis_server.url, ttl_s=60)
    await with_ttl.label_matrix(["ttl"], TEMPLATES, DEADLINE)
    assert 0 < await raw.ttl(with_ttl.key("ttl", TEMPLATES)) <= 60
    without, _, _ = await make_cache(redis_url=redis_server.url)
    await without.label_matrix(["no ttl"], TEMPLATES, DEADLINE)
    assert await raw.ttl(without.key("no ttl", TEMPLATES)) == -1


async def test_without_redis_the_memory_tier_works(make_cache: MakeCache) -> None:
    cache, encoder, metrics = await make_cache()
    assert not cache.redis_available
    first = await cache.label_matrix(["a", "b"], TEMPLATES, DEADLINE)
    np.testing.assert_array_equal(await cache.label_matrix(["b", "a"], TEMPLATES, DEADLINE), first[::-1])
    assert len(encoder.calls) == 1 and lookups(metrics, "redis", "miss") == 0


async def test_redis_on_a_closed_port_at_connect_does_not_raise(make_cache: MakeCache) -> None:
    cache, encoder, metrics = await make_cache(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    assert redis_errors(metrics, "connect") == 1 and not cache.redis_available
    matrix = await cache.label_matrix(["a", "b"], TEMPLATES, DEADLINE)
    np.testing.assert_allclose(matrix[1], expected("b"), atol=1e-6)
    assert len(encoder.calls) == 1


async def test_a_slow_redis_costs_one_timeout_then_only_the_probe_tries_it(
    make_cache: MakeCache, manual_clock: ManualClock
) -> None:
    # A listening socket that never answers: connections open, every command times out.
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(64)
        url = f"redis://127.0.0.1:{blackhole.getsockname()[1]}/0"
        # The Redis timeout bounds the connect; without it the read would never return (a hang, caught here).
        cache, encoder, metrics = await asyncio.wait_for(
            make_cache(
                redis_url=url,
                redis_timeout_s=0.1,
                backoff_initial_s=5,
                clock=manual_clock.monotonic,
                probe_interval_s=0.02,
            ),
            timeout=30,
        )
        assert redis_errors(metrics, "connect") == 1 and not cache.redis_available
        for call in range(5):  # the breaker is open: requests never touch Redis, however much time passes
            matrix = await asyncio.wait_for(cache.label_matrix([f"slow {call}"], TEMPLATES, DEADLINE), timeout=30)
            np.testing.assert_allclose(matrix[0], expected(f"slow {call}"), atol=1e-6)
            manual_clock.advance(2)
        assert redis_errors(metrics) == 1 and len(encoder.calls) == 5
        # Past the 5 s backoff the probe PINGs, off the request path; each PING times out and the breaker stays open.
        await wait_until(lambda: redis_errors(metrics, "probe") >= 2, "the probe tries the slow Redis")
        assert not cache.redis_available and redis_errors(metrics) == 1


async def test_redis_outage_and_recovery(make_cache: MakeCache, manual_clock: ManualClock) -> None:
    with RedisServer() as server:
        # Plain clients do not retry; one retry lets this one reconnect after the restart (as the cache's does).
        raw = aioredis.Redis.from_url(server.url, retry=Retry(NoBackoff(), 1))
        try:
            cache, _, metrics = await make_cache(
                redis_url=server.url,
                backoff_initial_s=1,
                backoff_max_s=4,
                clock=manual_clock.monotonic,
                probe_interval_s=0.02,
            )
            await cache.label_matrix(["before"], TEMPLATES, DEADLINE)
            assert await raw.exists(cache.key("before", TEMPLATES)) == 1

            server.stop()
            for call in range(20):  # the breaker keeps every call after the first away from the dead Redis
                matrix = await cache.label_matrix([f"down {call}", "before"], TEMPLATES, DEADLINE)
                np.testing.assert_allclose(matrix[0], expected(f"down {call}"), atol=1e-6)
            assert redis_errors(metrics) == 1 and redis_errors(metrics, "connect") == 0
            await asyncio.sleep(0.1)  # five probe intervals, inside the 1 s backoff: not even the probe tries
            assert redis_errors(metrics, "probe") == 0
            manual_clock.advance(1)
            await wait_until(lambda: redis_errors(metrics, "probe") >= 2, "the probe tries the dead Redis")
            for call in range(5):  # new labels: the memory tier must not answer, and Redis is still left alone
                await cache.label_matrix([f"still down {call}"], TEMPLATES, DEADLINE)
            assert redis_errors(metrics) == 1 and not cache.redis_available

            server.start()  # same port, empty: the probe finds it, without any request's help
            await wait_until(lambda: cache.redis_available, "the probe closes the breaker", timeout_s=2)
            await cache.label_matrix(["after"], TEMPLATES, DEADLINE)
            assert redis_errors(metrics) == 1
            assert await raw.exists(cache.key("after", TEMPLATES)) == 1
        finally:
            await raw.aclose()


async def test_an_encode_failure_reaches_every_waiter_and_is_not_cached(make_cache: MakeCache) -> None:
    cache, encoder, _ = await make_cache()
    encoder.error, encoder.delay_s = RuntimeError("text engine down"), 0.02
    results = await asyncio.gather(
        *(cache.label_matrix(["x", "y"], TEMPLATES, DEADLINE) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, RuntimeError) and str(r) == "text engine down" for r in results)
    assert len(encoder.calls) == 1

    encoder.error = None
    matrix = await cache.label_matrix(["x", "y"], TEMPLATES, DEADLINE)
    np.testing.assert_allclose(matrix, np.stack([expected("x"), expected("y")]), atol=1e-6)
    assert len(encoder.calls) == 2


async def test_an_encoder_returning_the_wrong_shape_is_an_error(make_cache: MakeCache) -> None:
    async def broken(prompts: list[str], deadline: Deadline, *, background: bool = False) -> np.ndarray:
        return np.zeros((len(prompts), DIM + 1), np.float32)

    cache, _, _ = await make_cache(encode=broken)
    with pytest.raises(ValueError, match="shape"):
        await cache.label_matrix(["a"], TEMPLATES, DEADLINE)


async def test_finished_chunks_stay_cached_when_the_rest_fails(
    make_cache: MakeCache, redis_server: RedisServer, raw: aioredis.Redis
) -> None:
    """Work cut short keeps what it finished: a retry encodes only the labels of the chunks that did not."""
    cache, encoder, _ = await make_cache(redis_url=redis_server.url, chunk_prompts=6)  # 2 labels x 3 templates
    labels = [f"chunked {i}" for i in range(7)]
    encoder.error, encoder.fail_call = RuntimeError("text engine gone mid-way"), 2
    with pytest.raises(RuntimeError, match="mid-way"):
        await cache.label_matrix(labels, TEMPLATES, DEADLINE)
    assert [len(call) for call in encoder.calls] == [6, 6, 6]  # chunks of 2 labels, the third failed
    assert await raw.exists(*(cache.key(label, TEMPLATES) for label in labels)) == 4

    encoder.error = None
    matrix = await cache.label_matrix(labels, TEMPLATES, DEADLINE)
    np.testing.assert_allclose(matrix, np.stack([expected(label) for label in labels]), atol=1e-6)
    retry = [p for call in encoder.calls[3:] for p in call]
    assert sorted(retry) == sorted(t.format(label) for label in labels[4:] for t in TEMPLATES)
    assert [len(call) for call in encoder.calls[3:]] == [6, 3]  # the last chunk holds the one label left


async def test_cached_matrix_reads_memory_and_redis_and_never_encodes(
    make_cache: MakeCache, redis_server: RedisServer
) -> None:
    writer, _, _ = await make_cache(redis_url=redis_server.url)
    await writer.label_matrix(["in redis"], TEMPLATES, DEADLINE, background=True)
    cache, encoder, _ = await make_cache(redis_url=redis_server.url)
    await cache.label_matrix(["in memory"], TEMPLATES, DEADLINE)
    both = await cache.cached_matrix(["in memory", "in redis", "in memory"], TEMPLATES)
    assert both is not None and both.shape == (3, DIM)
    np.testing.assert_allclose(both[1], expected("in redis"), atol=1e-6)
    assert await cache.cached_matrix(["in memory", "nowhere"], TEMPLATES) is None
    assert len(encoder.calls) == 1 and encoder.background == [False]
