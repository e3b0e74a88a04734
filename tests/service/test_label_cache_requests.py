"""Label vectors for requests: cache keys of template sets, and text work nobody waits for any more."""

from __future__ import annotations

import numpy as np

from service.deadline import Deadline
from service.labels.cache import LabelCache
from service.labels.memory import MemoryTier
from service.metrics import Metrics
from tests.service.conftest import b64, engine_calls, running_app, shape_png

LABELS = ["red circle", "blue triangle"]


async def test_template_sets_with_separators_do_not_share_cache_keys():
    async def encode(prompts: list[str], deadline: Deadline) -> np.ndarray:
        return np.ones((len(prompts), 4), np.float32) / 2

    cache = LabelCache(namespace="t", dim=4, encode=encode, metrics=Metrics(), memory=MemoryTier(1 << 20))
    assert cache.key("x", ["a {}\x00b", "c {}"]) != cache.key("x", ["a {}", "b\x00c {}"])


async def test_text_work_nobody_waits_for_is_stopped():
    """A request whose prompts outlast its deadline: the text engine must stop working for it, not run on."""
    # One prompt per engine call makes 32,000 prompts minutes of work, while tokenising them (done before the
    # first call) takes about a second here: the deadline lands mid-encoding, which is what this test is about.
    async with running_app(request_timeout_s=4.0, text_max_batch_size=1) as (app, client):
        body = {"images": [b64(shape_png())], "labels": [f"thing {i}" for i in range(400)], "templates": "imagenet"}
        response = await client.post("/classify", json=body)
        assert response.status_code == 504
        calls = engine_calls(app)
        assert calls > 0, "the deadline passed before encoding began: the test would prove nothing"
        assert calls < 400 * 80  # it stopped well before the end
        # Inside the 4 s request timeout: a text engine still busy with the abandoned prompts would make this 504.
        small = await client.post("/classify", json={"images": [b64(shape_png())], "labels": LABELS})
        assert small.status_code == 200
        # Counted, not waited for: since the 504 the text engine ran the small request's 2 x 7 prompts and at
        # most the one call that was in flight; an abandoned encoding still running would add thousands.
        assert engine_calls(app) - calls <= 2 * 7 + 1, "the abandoned encoding kept running"
        print(f"engine calls before the stop: {calls} of {400 * 80}")
