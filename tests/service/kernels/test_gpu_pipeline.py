"""/classify and /embed on the GPU path answer as the CPU path does, with the GPU faked at its boundary.

The app runs for real (lifespan, batcher, label cache, routes, the demo model's ONNX Runtime engines); only what
needs a GPU is replaced: the image engine's `embed_on_device` leaves its output in host memory posing as device
memory, and the CUDA driver is HostMemoryDriver, whose launches run the kernel's row code on host threads.
"""

from __future__ import annotations

import asyncio
import ctypes
from pathlib import Path

import numpy as np
import pytest

import service.app
import service.gpu.driver
from service.engines.factory import EnginePair
from service.gpu.device_array import DeviceArray
from service.kernels.build import build
from tests.service.conftest import b64, running_app, shape_png
from tests.service.kernels.host_kernels import HostMemoryDriver, HostRowKernel, nvcc_or_skip


class HostResidentEngine:
    """A device-resident engine in appearance: `embed_on_device` returns its output as a DeviceArray over host
    memory (the fake GPU boundary); everything else is the wrapped real engine."""

    device_resident = True

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.role, self.precision = inner, inner.role, inner.precision
        self.max_batch_size, self.description = inner.max_batch_size, f"host-resident {inner.description}"
        self.device_calls = 0

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        return self.inner(inputs)

    def embed_on_device(self, inputs: np.ndarray) -> DeviceArray:
        self.device_calls += 1
        output = np.ascontiguousarray(self.inner(inputs), dtype=np.float32)
        return DeviceArray(
            output.ctypes.data,
            output.shape,
            "float32",
            owner=output,
            copy_to_host=lambda pointer, out: ctypes.memmove(out.ctypes.data, pointer, out.nbytes),
        )

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch, host_kernel: HostRowKernel, tmp_path: Path) -> Path:
    driver = HostMemoryDriver(host_kernel, threads=32)
    monkeypatch.setattr(service.gpu.driver, "default_driver", lambda: driver)
    real_build = service.app.build_engines

    def build_host_resident(*args, **kwargs):  # type: ignore[no-untyped-def]
        pair = real_build(*args, **kwargs)
        return EnginePair(image=HostResidentEngine(pair.image), text=pair.text)

    monkeypatch.setattr(service.app, "build_engines", build_host_resident)
    return build(tmp_path / "similarity.fatbin", nvcc_or_skip())


async def answers(**settings: object) -> tuple[str, list[dict], list[dict], list[list[float]]]:
    images = [b64(shape_png("circle", "red")), b64(shape_png("triangle", "blue")), b64(shape_png("square", "green"))]
    labels = ["a red circle", "a blue triangle", "a green square", "a yellow hexagon"]
    async with running_app(**settings) as (app, client):
        top = await client.post("/classify", json={"images": images, "labels": labels, "top_k": 2})
        every = await client.post("/classify", json={"images": images[:1], "labels": labels})
        embedded = await client.post("/embed", json={"images": images})
        for response in (top, every, embedded):
            assert response.status_code == 200, response.text
        pipeline = app.state.pipeline  # type: ignore[attr-defined]
        backend = pipeline.similarity_backend
        # On the GPU path every image batch went through embed_on_device, /embed's included.
        assert (getattr(pipeline.engines.image, "device_calls", 0) >= 3) == (backend == "cuda")
        return backend, top.json()["results"], every.json()["results"], embedded.json()["images"]


def assert_same_results(gpu: list[dict], cpu: list[dict]) -> None:
    assert [[label["label"] for label in r["labels"]] for r in gpu] == [[x["label"] for x in r["labels"]] for r in cpu]
    for gpu_result, cpu_result in zip(gpu, cpu, strict=True):
        for ours, theirs in zip(gpu_result["labels"], cpu_result["labels"], strict=True):
            assert ours["probability"] == pytest.approx(theirs["probability"], abs=1e-5)
            assert ours["score"] == pytest.approx(theirs["score"], abs=1e-6)


async def test_classify_and_embed_match_the_cpu_path(fake_gpu: Path) -> None:
    backend, top, every, embedded = await answers(similarity="cuda", cuda_kernels=fake_gpu)
    assert backend == "cuda"
    cpu_backend, cpu_top, cpu_every, cpu_embedded = await answers(similarity="numpy")
    assert cpu_backend == "numpy"
    assert_same_results(top, cpu_top)
    assert_same_results(every, cpu_every)
    assert len(top[0]["labels"]) == 2 and len(every[0]["labels"]) == 4
    np.testing.assert_allclose(np.array(embedded), np.array(cpu_embedded), atol=1e-6)


async def test_auto_falls_back_to_numpy_when_the_kernel_is_missing(fake_gpu: Path, tmp_path: Path) -> None:
    backend, *_ = await answers(similarity="auto", cuda_kernels=tmp_path / "not-built.fatbin")
    assert backend == "numpy"


async def test_cuda_similarity_refuses_to_start_without_the_kernel(fake_gpu: Path, tmp_path: Path) -> None:
    from service.engines.base import EngineError

    with pytest.raises(EngineError, match="make kernels"):
        await answers(similarity="cuda", cuda_kernels=tmp_path / "not-built.fatbin")


async def test_cuda_similarity_refuses_a_host_engine() -> None:
    from service.engines.base import EngineError

    with pytest.raises(EngineError, match="keeps embeddings on the GPU"):
        await answers(similarity="cuda")


async def test_gpu_preprocessing_without_a_gpu_is_a_clear_start_error() -> None:
    from service.engines.base import EngineError
    from tests.gpu import cuda_available

    if cuda_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(EngineError, match="CLIPSERVE_PREPROCESS_DEVICE=cuda"):
        await answers(preprocess_device="cuda")


async def few_shot_answer(**settings: object) -> tuple[str, list[dict]]:
    """A saved classifier with examples: its per-label bias is scored on the host even on the GPU path."""
    async with running_app(**settings) as (app, client):
        labels = ["red circle", "blue triangle", "green square"]
        assert (await client.put("/v1/classifiers/shots", json={"labels": labels})).status_code in (201, 202)
        body = {"label": "red circle", "images": [b64(shape_png("circle", "red", (120, 90)))]}
        assert (await client.post("/v1/classifiers/shots/examples", json=body)).status_code == 200
        body = {"label": "green square", "images": [b64(shape_png("square", "green", (90, 90)))]}
        assert (await client.post("/v1/classifiers/shots/examples", json=body)).status_code == 200
        for _ in range(6000):
            if (await client.get("/v1/classifiers/shots")).json()["status"] == "ready":
                break
            await asyncio.sleep(0.01)
        images = [b64(shape_png("circle", "red")), b64(shape_png("hexagon", "yellow"))]
        response = await client.post("/classify", json={"images": images, "classifier": "shots"})
        assert response.status_code == 200, response.text
        return app.state.pipeline.similarity_backend, response.json()["results"]  # type: ignore[attr-defined]


async def test_a_classifier_with_examples_answers_as_the_cpu_path(fake_gpu: Path) -> None:
    backend, gpu = await few_shot_answer(similarity="cuda", cuda_kernels=fake_gpu)
    cpu_backend, cpu = await few_shot_answer(similarity="numpy")
    assert (backend, cpu_backend) == ("cuda", "numpy")
    assert_same_results(gpu, cpu)
