"""Startup, shutdown and connection handling: what the lifespan refuses, and what a vanished client frees."""

from __future__ import annotations

import asyncio
import shutil

import httpx
import numpy as np
import pytest

from models.demo.config import EXPORT_NAME, REPOSITORY_DIR
from models.manifest import ArtifactIntegrityError
from service.engines.base import EngineError
from service.engines.onnxruntime import OnnxRuntimeEngine
from tests.service.conftest import b64, live_server, running_app, shape_png, wait_until

LABELS = ["red circle", "blue triangle"]


async def test_a_corrupted_model_is_refused_at_startup(tmp_path):
    shutil.copytree(REPOSITORY_DIR / EXPORT_NAME, tmp_path / EXPORT_NAME)
    graph = tmp_path / EXPORT_NAME / "image.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 3] ^= 0x10
    graph.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match=r"image\.onnx"):
        async with running_app(model_repository=str(tmp_path)):
            pass


async def test_a_precision_that_was_not_exported_is_refused_at_startup():
    with pytest.raises(EngineError, match="fp16"):
        async with running_app(precision="fp16"):
            pass


async def test_torch_engine_serves_the_same_probabilities():
    pytest.importorskip("torch")
    body = {"images": [b64(shape_png())], "labels": LABELS, "templates": "photo"}
    async with running_app(engine="torch") as (_, client):
        from_torch = (await client.post("/classify", json=body)).json()
    async with running_app() as (_, client):
        from_onnx = (await client.post("/classify", json=body)).json()
    for a, b in zip(from_torch["results"][0]["labels"], from_onnx["results"][0]["labels"], strict=True):
        assert a["label"] == b["label"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_a_client_that_disconnects_does_not_keep_its_slot(monkeypatch):
    """The image engine is held busy; a client gives up; its queued image must never reach the engine."""
    import threading

    release = threading.Event()
    seen_batches: list[int] = []
    real_call = OnnxRuntimeEngine.__call__
    holding = threading.Event()

    def gated(self, inputs: np.ndarray) -> np.ndarray:  # test seam around the real engine
        if self.role == "image" and holding.is_set():
            seen_batches.append(len(inputs))
            release.wait(timeout=30)
        return real_call(self, inputs)

    monkeypatch.setattr(OnnxRuntimeEngine, "__call__", gated)
    body = {"images": [b64(shape_png())], "labels": LABELS}
    with live_server(max_batch_size=1, max_wait_ms=0) as (app, url):
        httpx.post(f"{url}/classify", json=body, timeout=30).raise_for_status()  # labels cached
        holding.set()
        batcher = app.state.pipeline.image_batcher

        async def scenario() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                busy = asyncio.create_task(client.post("/classify", json=body))  # occupies the engine
                await wait_until(lambda: bool(seen_batches), "the busy request reached the engine")
                async with httpx.AsyncClient(base_url=url, timeout=30) as impatient:
                    waiting = asyncio.create_task(impatient.post("/classify", json=body))
                    await wait_until(lambda: batcher.depth == 1, "the impatient request was queued behind `busy`")
                    waiting.cancel()  # the client gives up: its connection closes
                    with pytest.raises(asyncio.CancelledError):
                        await waiting
                # The server notices the disconnect within its poll interval and withdraws the queued image.
                await wait_until(lambda: batcher.depth == 0, "the abandoned request left the queue")
                release.set()
                assert (await busy).status_code == 200

        asyncio.run(scenario())
        assert seen_batches == [1], "the abandoned request's image must not have been run"
        cancelled = app.state.metrics.value("clipserve_rejected_total", {"engine": "image", "reason": "cancelled"})
        assert cancelled >= 1
        # Counted as the client's doing (nginx's 499), not as a server error.
        requests = app.state.metrics.value
        assert requests("clipserve_requests_total", {"route": "/classify", "status": "499"}) == 1
        assert requests("clipserve_requests_total", {"route": "/classify", "status": "500"}) == 0


def test_model_selection_from_the_repository(tmp_path):
    from models.repository import ModelNotFoundError
    from service.model import model_directory
    from service.settings import Settings

    assert model_directory(Settings()) == REPOSITORY_DIR / EXPORT_NAME
    shutil.copytree(REPOSITORY_DIR / EXPORT_NAME, tmp_path / "only-model")
    assert model_directory(Settings(model_repository=tmp_path)) == tmp_path / "only-model"  # the single model
    shutil.copytree(REPOSITORY_DIR / EXPORT_NAME, tmp_path / "second")
    with pytest.raises(ModelNotFoundError, match="only-model, second"):
        model_directory(Settings(model_repository=tmp_path))
    assert model_directory(Settings(model_repository=tmp_path, model="second")) == tmp_path / "second"
    with pytest.raises(ModelNotFoundError, match="no exported model 'missing'"):
        model_directory(Settings(model_repository=tmp_path, model="missing"))
