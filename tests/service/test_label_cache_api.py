"""The label cache seen through /classify: real Redis (own redis-server per test), real engines."""

from __future__ import annotations

import redis

from tests.service.conftest import b64, running_app, shape_png, wait_until

THOUSAND_LABELS = [f"label number {i}" for i in range(1000)]


def _text_calls(app) -> float:
    return app.state.metrics.value("clipserve_batch_size_count", {"engine": "text"})


async def test_warm_labels_cost_no_text_engine_calls_here_or_on_a_second_instance(redis_server):
    body = {"images": [b64(shape_png())], "labels": THOUSAND_LABELS, "templates": "simple"}
    async with running_app(redis_url=redis_server.url) as (first, client):
        response = await client.post("/classify", json=body)
        assert response.status_code == 200, response.text
        assert _text_calls(first) >= 1  # cold: 7,000 prompts encoded
        cold = response.json()["results"]
        before = _text_calls(first)
        again = await client.post("/classify", json=body)
        assert again.status_code == 200 and _text_calls(first) == before  # warm: memory tier
    async with running_app(redis_url=redis_server.url) as (second, client):
        response = await client.post("/classify", json=body)
        assert response.status_code == 200, response.text
        assert _text_calls(second) == 0  # a fresh instance reads all 1,000 vectors from Redis
        assert response.json()["results"] == cold
        hits = second.state.metrics.value("clipserve_label_cache_total", {"tier": "redis", "result": "hit"})
        assert hits == 1000


async def test_redis_outage_mid_stream_fails_no_request(redis_server):
    raw = redis.Redis.from_url(redis_server.url)
    async with running_app(redis_url=redis_server.url, redis_timeout_ms=200) as (app, client):
        cache = app.state.pipeline.label_cache

        async def classify(i: int) -> int:
            body = {"images": [b64(shape_png())], "labels": [f"thing {i}", f"other {i}"], "templates": "bare"}
            return (await client.post("/classify", json=body)).status_code

        assert [await classify(i) for i in range(5)] == [200] * 5
        keys_before = len(raw.keys("clipserve:*"))
        assert keys_before == 10
        redis_server.stop()
        statuses = [await classify(i) for i in range(5, 25)]
        assert statuses == [200] * 20
        errors = sum(
            app.state.metrics.value("clipserve_redis_errors_total", {"operation": op})
            for op in ("mget", "set", "connect")
        )
        assert errors >= 1
        redis_server.start()
        raw = redis.Redis.from_url(redis_server.url)  # the restarted server starts empty (no persistence)
        # The breaker's probe (every 0.5 s by default) lets Redis back in; no request has to find out first.
        await wait_until(lambda: cache.redis_available, "the probe closes the breaker", timeout_s=2)
        statuses = [await classify(i) for i in range(100, 110)]
        assert statuses == [200] * 10
        assert len(raw.keys("clipserve:*")) >= 2, "new vectors should be written to Redis again"


async def test_without_redis_the_memory_tier_serves(demo):
    app, client = demo
    body = {"images": [b64(shape_png())], "labels": ["a", "b", "c"]}
    await client.post("/classify", json=body)
    calls = _text_calls(app)
    assert (await client.post("/classify", json=body)).status_code == 200
    assert _text_calls(app) == calls


async def test_label_cache_namespace_names_what_the_text_engine_computes_in():
    """The key carries the text engine's precision (int8 graphs here; fp16 for TensorRT plans), not a guess."""
    async with running_app(precision="int8") as (app, _):
        namespace = app.state.pipeline.label_cache.namespace
    assert namespace.startswith("clipserve:v1:") and namespace.endswith(":int8")
