"""Redis faults seen through /classify: Redis stopped, hanging past the client timeout, restarted empty, or
holding something other than a label vector. No request fails, every answer equals the answer of an app without
Redis (exactly), and a Redis that comes back is used again within 2 s: the breaker's probe finds it, not a
request. Then the breaker on its own (RedisTier), and saved classifiers with their store (Redis) down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.labels.backoff import Backoff
from service.labels.memory import MemoryTier
from service.labels.redis_tier import RedisTier
from service.metrics import Metrics
from tests.service.conftest import b64, engine_calls, running_app, shape_png, wait_until
from tests.service.redis_server import RedisServer, free_port

IMAGES = [b64(shape_png()), b64(shape_png("circle", "red"))]
TEMPLATES = ("{}",)  # the "bare" preset: one prompt per label keeps the text engine's share small
BACK_WITHIN_S = 2.0  # a Redis that accepts connections again is used again within this
# A client timeout no healthy call reaches on a loaded 2-core machine: a spurious timeout would open the breaker
# and upset the error counts these tests assert (a stopped Redis refuses at once; it needs no timeout at all).
GENEROUS_TIMEOUT_MS = 1000


def body(labels: list[str]) -> dict[str, Any]:
    return {"images": IMAGES, "labels": labels, "templates": "bare"}


async def answers_without_redis(bodies: list[dict[str, Any]]) -> list[Any]:
    """What an app with no Redis at all answers: the answer every fault must leave unchanged."""
    async with running_app() as (_, client):
        return [await results(client, b) for b in bodies]


async def results(client: Any, request: dict[str, Any]) -> Any:
    response = await client.post("/classify", json=request)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def request_path_errors(app: Any) -> float:
    """Failed Redis calls made by requests (and startup), not by the breaker's probe."""
    metrics = app.state.metrics
    return sum(metrics.value("clipserve_redis_errors_total", {"operation": op}) for op in ("mget", "set", "connect"))


def probe_errors(metrics: Metrics) -> float:
    return metrics.value("clipserve_redis_errors_total", {"operation": "probe"})


def redis_lookups(app: Any, result: str) -> float:
    return app.state.metrics.value("clipserve_label_cache_total", {"tier": "redis", "result": result})


def forget_memory(app: Any) -> None:
    """Empties the memory tier and the label sets in front of it, so that the next lookups go to Redis."""
    cache = app.state.pipeline.label_cache
    cache.memory = MemoryTier(cache.memory.max_bytes)
    cache.sets.clear()


async def test_redis_stopped_fails_no_request_and_changes_no_answer(redis_server: RedisServer) -> None:
    bodies = [body([f"stopped {i}", f"stopped {i} too", "shared"]) for i in range(12)]
    expected = await answers_without_redis(bodies)
    async with running_app(redis_url=redis_server.url, redis_timeout_ms=GENEROUS_TIMEOUT_MS) as (app, client):
        for request, answer in zip(bodies[:3], expected[:3], strict=True):  # some vectors in memory and Redis first
            assert await results(client, request) == answer
        redis_server.stop()
        for request, answer in zip(bodies, expected, strict=True):
            assert await results(client, request) == answer
        # One request found Redis gone; every later one left it alone (no error of its own).
        assert request_path_errors(app) == 1
        tier = app.state.pipeline.label_cache.redis
        assert not tier.available and tier.probing
        await wait_until(lambda: probe_errors(app.state.metrics) >= 1, "the probe tries the stopped Redis")


async def test_redis_paused_past_the_client_timeout_costs_one_timeout_then_nothing(redis_server: RedisServer) -> None:
    bodies = [body([f"paused {i}", "shared"]) for i in range(10)]
    expected = await answers_without_redis(bodies)
    async with running_app(redis_url=redis_server.url, redis_timeout_ms=250) as (app, client):
        assert await results(client, body(["warm"]))
        pause_s = 3.0
        redis_server.pause(int(pause_s * 1000))
        paused_until = time.monotonic() + pause_s
        for i, (request, answer) in enumerate(zip(bodies, expected, strict=True)):
            response = await client.post("/classify", json=request)
            assert response.status_code == 200 and response.json()["results"] == answer
            if i == 0:  # the request that met the hung Redis waited for the client timeout, not for the pause
                assert response.json()["timing"]["labels_ms"] < 1500
        assert request_path_errors(app) == 1 and time.monotonic() < paused_until, "the requests waited for Redis"
        cache = app.state.pipeline.label_cache
        await wait_until(lambda: cache.redis_available, "Redis used again after the pause", timeout_s=pause_s + 5)
        back_after_s = time.monotonic() - paused_until
        assert back_after_s < BACK_WITHIN_S
        # Nothing a timed-out call left on a connection is read by a later one: answers from Redis are right.
        fresh = [body([f"after the pause {i}", "shared"]) for i in range(3)]
        for request, answer in zip(fresh, await answers_without_redis(fresh), strict=True):
            assert await results(client, request) == answer
        forget_memory(app)
        hits = redis_lookups(app, "hit")
        for request, answer in zip(fresh + bodies, await answers_without_redis(fresh) + expected, strict=True):
            assert await results(client, request) == answer
        # The fresh labels were written and are read back; "shared" was learnt while Redis was left alone, so it
        # is a miss there (encoded again, and written now).
        assert redis_lookups(app, "hit") - hits == len(fresh)
        print(f"Redis used again {back_after_s:.2f} s after the pause ended")


async def test_redis_restarted_empty_is_written_and_read_again_within_two_seconds(redis_server: RedisServer) -> None:
    async with running_app(redis_url=redis_server.url, redis_timeout_ms=GENEROUS_TIMEOUT_MS) as (app, client):
        cache = app.state.pipeline.label_cache
        before = [body([f"before {i}"]) for i in range(3)]
        expected_before = await answers_without_redis(before)
        for request, answer in zip(before, expected_before, strict=True):
            assert await results(client, request) == answer
        redis_server.stop()
        outage_end = time.monotonic() + 1.0
        count = 0
        while time.monotonic() < outage_end:  # requests during the outage: served from memory and the engine
            assert await results(client, body([f"down {count}"]))
            count += 1
            await asyncio.sleep(0.02)
        assert not cache.redis_available and request_path_errors(app) == 1

        redis_server.start()  # same port, nothing in it (no persistence)
        accepting = time.monotonic()
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            written: list[str] = []  # labels whose vectors reached the restarted Redis
            while not written:
                label = f"up {count}"
                count += 1
                assert await results(client, body([label]))
                if await raw.exists(cache.key(label, TEMPLATES)):
                    written.append(label)
                elif time.monotonic() - accepting > 10:
                    raise AssertionError("nothing written to the restarted Redis in 10 s")
                else:
                    await asyncio.sleep(0.02)
            back_after_s = time.monotonic() - accepting
            print(f"vectors written to the restarted Redis {back_after_s:.2f} s after it accepted connections")
            assert back_after_s < BACK_WITHIN_S
            assert request_path_errors(app) == 1  # the probe found it: no request paid for finding out

            # Reads hit it again, and it answers what the engine did; the vectors it lost are encoded again.
            forget_memory(app)
            calls, hits = engine_calls(app), redis_lookups(app, "hit")
            assert await results(client, body(written)) == (await answers_without_redis([body(written)]))[0]
            assert redis_lookups(app, "hit") == hits + 1 and engine_calls(app) == calls
            for request, answer in zip(before, expected_before, strict=True):
                assert await results(client, request) == answer
            assert await raw.exists(*(cache.key(f"before {i}", TEMPLATES) for i in range(3))) == 3
        finally:
            await raw.aclose()


async def test_values_that_are_not_label_vectors_are_misses_and_are_overwritten(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    labels = ["short", "garbage", "float64", "float16", "float64, half of it", "nan", "zeros", "big-endian", "a list"]
    expected = (await answers_without_redis([body(labels)]))[0]
    settings: dict[str, Any] = {"redis_url": redis_server.url, "redis_timeout_ms": GENEROUS_TIMEOUT_MS}
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        async with running_app(**settings) as (app, client):
            assert await results(client, body(labels)) == expected
            keys = {label: app.state.pipeline.label_cache.key(label, TEMPLATES) for label in labels}
        good = {label: await raw.get(key) for label, key in keys.items()}
        vector = {label: np.frombuffer(value, "<f4") for label, value in good.items()}
        dim = vector["short"].size

        async def corrupt() -> None:
            await raw.set(keys["short"], good["short"][:-1])
            await raw.set(keys["garbage"], np.random.default_rng(0).bytes(dim * 4))
            await raw.set(keys["float64"], vector["float64"].astype(np.float64).tobytes())
            await raw.set(keys["float16"], vector["float16"].astype(np.float16).tobytes())
            # The right length, the wrong dtype: half the vector in float64.
            await raw.set(
                keys["float64, half of it"], vector["float64, half of it"][: dim // 2].astype("<f8").tobytes()
            )
            await raw.set(keys["nan"], np.full(dim, np.nan, np.float32).tobytes())
            await raw.set(keys["zeros"], bytes(dim * 4))
            await raw.set(keys["big-endian"], vector["big-endian"].astype(">f4").tobytes())
            await raw.delete(keys["a list"])
            await raw.rpush(keys["a list"], good["a list"])  # not a string: MGET answers nil

        await corrupt()
        caplog.set_level(logging.WARNING, logger="clipserve.label_cache")
        async with running_app(**settings) as (app, client):  # memory empty: every label from Redis
            assert await results(client, body(labels)) == expected
            assert redis_lookups(app, "malformed") == 8 and redis_lookups(app, "miss") == 1
            assert redis_lookups(app, "hit") == 0
            assert {label: await raw.get(key) for label, key in keys.items()} == good  # each one overwritten

            await corrupt()  # a writer that keeps putting them back: still right, counted, logged once per key
            forget_memory(app)
            assert await results(client, body(labels)) == expected
            assert redis_lookups(app, "malformed") == 16
        warned = [r for r in caplog.records if "is not a label vector" in r.getMessage()]
        assert len(warned) == 8 and {r.levelno for r in warned} == {logging.WARNING}
        named = {key for key in keys.values() if any(key in r.getMessage() for r in warned)}
        assert named == set(keys.values()) - {keys["a list"]}  # each corrupted key once; nil is a plain miss
    finally:
        await raw.aclose()


# --- the breaker on its own -----------------------------------------------------------------------------------


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _tier(url: str, clock: ManualClock, metrics: Metrics | None = None, **options: Any) -> RedisTier:
    """A tier whose shortest stay-away is 1 s of `clock` (doubling up to 4 s), probing every 20 ms."""
    backoff = Backoff(1, 4, clock)
    options = {"timeout_s": GENEROUS_TIMEOUT_MS / 1000} | options
    tier = RedisTier(url, dim=4, metrics=metrics or Metrics(), backoff=backoff, probe_interval_s=0.02, **options)
    await tier.connect()
    return tier


def probes_running() -> int:
    return sum(task.get_name() == "clipserve-redis-probe" and not task.done() for task in asyncio.all_tasks())


async def test_the_probe_runs_while_the_breaker_is_open_and_stops_with_the_app() -> None:
    clock, metrics = ManualClock(), Metrics()
    tier = await _tier(f"redis://127.0.0.1:{free_port()}/0", clock, metrics)
    try:
        assert not tier.available and tier.probing and probes_running() == 1
        await asyncio.sleep(0.1)  # five probe intervals, inside the first stay-away (1 s): no PING yet
        assert probe_errors(metrics) == 0
        clock.now += 1
        await wait_until(lambda: probe_errors(metrics) >= 2, "the probe pings the closed port")
        assert await tier.get_many(["k"]) == {} and probes_running() == 1
    finally:
        await tier.close()
    assert not tier.probing and probes_running() == 0

    # The app's shutdown (pipeline stop -> label cache close) stops it too: nothing left running after it.
    async with running_app(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_probe_interval_s=0.02) as (app, _):
        assert app.state.pipeline.label_cache.redis.probing and probes_running() == 1
    assert probes_running() == 0


async def test_callers_failing_together_open_the_breaker_once(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    tier = await _tier(redis_server.url, clock, timeout_s=0.25)
    try:
        assert tier.available and not tier.probing
        redis_server.pause(1500)
        caplog.set_level(logging.WARNING, logger="clipserve.label_cache")
        found = await asyncio.gather(*(tier.get_many([f"key {i}"]) for i in range(10)))
        assert found == [{}] * 10 and not tier.available
        assert len([r for r in caplog.records if "leaving Redis alone" in r.getMessage()]) == 1
        # The shortest stay-away is the first one (1 s), not doubled once per caller: the probe lets Redis back in
        # as soon as the pause ends.
        clock.now += 1
        await wait_until(lambda: tier.available, "Redis used again after the pause", timeout_s=5)
        assert not tier.probing
    finally:
        await tier.close()


async def test_a_redis_that_answers_ping_but_fails_calls_is_let_back_in_less_and_less_often(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock()
    tier = await _tier(redis_server.url, clock)
    vector = np.full(4, 0.5, np.float32)  # unit length: a label vector
    try:

        async def hangs(*args: Any, **kwargs: Any) -> Any:
            raise RedisTimeoutError("Timeout reading from socket")

        monkeypatch.setattr(tier.client, "mget", hangs)
        for stay_away_s in (1, 2, 4, 4):  # doubling up to the cap while no real call succeeds
            assert await tier.get_many(["k"]) == {} and not tier.available
            clock.now += stay_away_s - 0.01
            await asyncio.sleep(0.1)  # five probe intervals: inside the stay-away, not even the probe tries
            assert not tier.available
            clock.now += 0.02
            await wait_until(lambda: tier.available, "the probe lets Redis back in")
        monkeypatch.undo()
        await tier.set_many({"k": vector})
        np.testing.assert_array_equal((await tier.get_many(["k"]))["k"], vector)  # a success resets the wait
        monkeypatch.setattr(tier.client, "mget", hangs)
        assert await tier.get_many(["k"]) == {} and not tier.available
        clock.now += 1
        await wait_until(lambda: tier.available, "back after the first stay-away again")
    finally:
        await tier.close()


# --- saved classifiers, whose definitions live in Redis ------------------------------------------------------


async def test_classifier_management_with_redis_down_is_a_clear_503_and_inline_labels_still_work(
    redis_server: RedisServer,
) -> None:
    inline = body(["inline one", "inline two"])
    expected = (await answers_without_redis([inline]))[0]
    async with running_app(redis_url=redis_server.url) as (_, client):
        assert (await client.put("/v1/classifiers/kept", json={"labels": ["a", "b"]})).status_code in (201, 202)
        for _ in range(3000):  # prepared in the background
            if (status := (await client.get("/v1/classifiers/kept")).json()["status"]) == "ready":
                break
            await asyncio.sleep(0.01)
        assert status == "ready"
        by_name = await results(client, {"images": IMAGES, "classifier": "kept"})
        redis_server.stop()
        calls = [
            client.put("/v1/classifiers/new", json={"labels": ["c"]}),
            client.get("/v1/classifiers"),
            client.get("/v1/classifiers/never-seen"),
            client.delete("/v1/classifiers/kept"),
        ]
        for call in calls:
            start = time.monotonic()
            response = await call
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "store_unavailable"
            assert time.monotonic() - start < 2.5  # a clear answer, not a hang (the store's timeout is 2 s)
        assert await results(client, inline) == expected
        # What this replica already has keeps serving (registry: "Redis is down: serve what this replica has").
        assert await results(client, {"images": IMAGES, "classifier": "kept"}) == by_name

        redis_server.start()  # empty: the definition is gone with it
        assert (await client.put("/v1/classifiers/new", json={"labels": ["c"]})).status_code in (201, 202)
        assert (await client.get("/v1/classifiers")).status_code == 200
