"""Label vectors for requests: cache keys of template sets, text work nobody waits for any more, and work cut
short that keeps what it finished."""

from __future__ import annotations

import threading

import numpy as np

import service.app
from service.deadline import Deadline
from service.engines.factory import EnginePair
from service.labels.cache import LabelCache
from service.labels.memory import MemoryTier
from service.metrics import Metrics
from tests.service.conftest import b64, engine_calls, running_app, shape_png

LABELS = ["red circle", "blue triangle"]


async def test_template_sets_with_separators_do_not_share_cache_keys():
    async def encode(prompts: list[str], deadline: Deadline, *, background: bool = False) -> np.ndarray:
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


class GatedTextEngine:
    """The real text engine, except that after `open_calls` calls each call waits for `gate`: the slow text
    engine of a CPU node meeting a large label set, made deterministic."""

    def __init__(self, inner, open_calls: int) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.open_calls = inner, open_calls
        self.gate = threading.Event()
        self.rows: list[int] = []  # per call, as it starts

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)  # role, precision, max_batch_size, description, close

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        self.rows.append(len(ids))
        if len(self.rows) > self.open_calls:
            assert self.gate.wait(timeout=60), "the test never opened the gate"
        return self.inner(ids)


async def test_an_abandoned_encoding_keeps_its_finished_chunks_and_a_retry_completes(monkeypatch):
    """60 new labels x 7 templates in chunks of 9 labels (63 prompts, 4 engine calls of at most 16): the engine
    runs 3 chunks, then stalls past the request's deadline. The 504 keeps those 27 labels cached, and the retry
    encodes only the other 33."""
    real_build = service.app.build_engines
    gated: list[GatedTextEngine] = []

    def build_gated(*args, **kwargs):  # type: ignore[no-untyped-def]
        pair = real_build(*args, **kwargs)
        gated.append(GatedTextEngine(pair.text, open_calls=12))
        return EnginePair(image=pair.image, text=gated[-1])

    monkeypatch.setattr(service.app, "build_engines", build_gated)
    # 4 s: ample for the 12 open calls on a loaded machine; the stalled 13th holds the request past it.
    settings = {"request_timeout_s": 4.0, "text_max_batch_size": 16, "label_chunk_prompts": 64}
    labels = [f"made-up thing {i}" for i in range(60)]
    body = {"images": [b64(shape_png())], "labels": labels, "templates": "simple"}
    async with running_app(**settings) as (_, client):
        engine = gated[-1]
        warm = len(engine.rows)  # warm-up calls at startup count as open calls too
        engine.open_calls += warm
        assert (await client.post("/classify", json=body)).status_code == 504
        assert engine.rows[warm : warm + 12] == [16, 16, 16, 15] * 3  # three whole chunks ran
        engine.gate.set()  # the stalled call returns; nobody waits for it any more
        retry = await client.post("/classify", json=body)
        assert retry.status_code == 200, retry.text
        rows_before_retry = warm + 13  # the 12 calls that ran, and the one that stalled
        assert sum(engine.rows[rows_before_retry:]) == 33 * 7  # only the labels of the unfinished chunks
    monkeypatch.setattr(service.app, "build_engines", real_build)
    async with running_app() as (_, client):  # the same request, never interrupted
        assert (await client.post("/classify", json=body)).json()["results"] == retry.json()["results"]
