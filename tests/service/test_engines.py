"""Engines and their factory: ONNX Runtime and torch on the committed demo model, TensorRT against a fake."""

from __future__ import annotations

import ctypes
import enum
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort
import pytest

from models.demo import shapes
from models.demo.config import EXPORT_NAME, REPOSITORY_DIR
from models.demo.dataset import render_chunk
from models.manifest import Artifact, Manifest, TensorRTBuild, load_manifest
from models.preprocess import ImageTransform
from models.tokenizer import ClipTokenizer
from service.engines import cuda_runtime
from service.engines import tensorrt as trt_engines
from service.engines.base import EngineError
from service.engines.factory import EnginePair, build_engines, warm_up
from service.engines.onnxruntime import PROVIDER_PREFERENCE, OnnxRuntimeEngine, choose_providers
from service.engines.tensorrt import TensorRTEngine, select_build
from service.settings import Settings
from tests.service.fake_tensorrt import EMBED_DIM, FakeDeviceMemory, fake_embed, make_fake_tensorrt, write_plan

ROOT = Path(__file__).resolve().parents[2]
DEMO_DIR = REPOSITORY_DIR / EXPORT_NAME
CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
CAPTIONS = ["a photo of a red circle.", "a blue square", "a green star.", "a yellow hexagon", "a purple triangle"]


def unit_rows(array: np.ndarray) -> np.ndarray:
    return array / np.linalg.norm(array, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return load_manifest(DEMO_DIR)


@pytest.fixture(scope="module")
def pixels(manifest: Manifest) -> np.ndarray:
    # Rendered demo images, not noise: int8 parity is only promised on inputs like the ones it serves.
    pool = render_chunk((3, 0, 5, shapes.SEEN_COMPOSITIONS))
    return ImageTransform(manifest.preprocess.config()).normalise(pool.pixels)


@pytest.fixture(scope="module")
def token_ids(manifest: Manifest) -> np.ndarray:
    return ClipTokenizer.from_file(DEMO_DIR / manifest.tokenizer.file, manifest.tokenizer.spec())(CAPTIONS)


@pytest.fixture(scope="module")
def ort_engines() -> dict[tuple[str, str], OnnxRuntimeEngine]:
    graphs = {
        ("image", "fp32"): "image.onnx",
        ("text", "fp32"): "text.onnx",
        ("image", "int8"): "image.int8.onnx",
        ("text", "int8"): "text.int8.onnx",
    }
    return {key: OnnxRuntimeEngine(DEMO_DIR / name, key[0], precision=key[1]) for key, name in graphs.items()}


def inputs_for(role: str, pixels: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
    return pixels if role == "image" else token_ids


# ------------------------------------------------------------------------------------------- onnxruntime


@pytest.mark.parametrize("role", ["image", "text"])
@pytest.mark.parametrize("batch", [1, 5])
def test_ort_fp32_gives_unit_norm_float32_rows(ort_engines, pixels, token_ids, role, batch):
    out = ort_engines[role, "fp32"](inputs_for(role, pixels, token_ids)[:batch])
    assert out.shape == (batch, 64)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("role", ["image", "text"])
def test_ort_int8_stays_close_to_fp32(ort_engines, pixels, token_ids, role):
    inputs = inputs_for(role, pixels, token_ids)
    fp32, int8 = ort_engines[role, "fp32"](inputs), ort_engines[role, "int8"](inputs)
    assert int8.dtype == np.float32
    cosines = (unit_rows(fp32.astype(np.float64)) * unit_rows(int8.astype(np.float64))).sum(axis=1)
    assert cosines.min() >= 0.99


@pytest.mark.parametrize("role,graph", [("image", "image.onnx"), ("text", "text.onnx")])
def test_ort_engine_equals_a_plain_inference_session(ort_engines, pixels, token_ids, role, graph):
    inputs = inputs_for(role, pixels, token_ids)
    session = ort.InferenceSession(str(DEMO_DIR / graph), providers=[CPU])
    direct = session.run(None, {session.get_inputs()[0].name: inputs})[0]
    np.testing.assert_allclose(ort_engines[role, "fp32"](inputs), direct, rtol=0, atol=1e-6)


def test_ort_engine_describes_itself(ort_engines):
    engine = ort_engines["image", "fp32"]
    assert engine.description == "onnxruntime CPUExecutionProvider fp32 image.onnx"
    assert engine.role == "image" and engine.max_batch_size is None


def test_ort_engine_refuses_calls_after_close():
    engine = OnnxRuntimeEngine(DEMO_DIR / "image.onnx", "image", precision="fp32")
    engine.close()
    with pytest.raises(EngineError, match="closed"):
        engine(np.zeros((1, 3, 64, 64), np.float32))


def test_ort_engine_missing_graph_is_an_engine_error(tmp_path):
    with pytest.raises(EngineError, match="does not exist"):
        OnnxRuntimeEngine(tmp_path / "image.onnx", "image", precision="fp32")


@pytest.mark.parametrize(
    "available,expected",
    [
        ([CUDA, CPU], [CUDA, CPU]),
        ([CPU, CUDA, TRT], [TRT, CUDA, CPU]),
        (["AzureExecutionProvider", CPU], [CPU]),
        ([CUDA], [CUDA]),
    ],
)
def test_choose_providers_follows_the_preference_filtered_by_availability(available, expected):
    assert choose_providers([], available) == expected


def test_choose_providers_honours_an_explicit_request_and_keeps_cpu_last():
    available = [TRT, CUDA, CPU]
    assert choose_providers([CUDA], available) == [CUDA, CPU]
    assert choose_providers([CPU, CUDA], available) == [CUDA, CPU]
    assert choose_providers([CPU], available) == [CPU]


def test_choose_providers_refuses_an_unavailable_request_naming_what_is_available():
    with pytest.raises(EngineError, match=r"CUDAExecutionProvider.*available: AzureExecutionProvider, CPU"):
        choose_providers([CUDA], ["AzureExecutionProvider", CPU])


def test_provider_preference_is_gpu_first_cpu_last():
    assert PROVIDER_PREFERENCE == (TRT, CUDA, CPU)


class CapturedSession:
    """Stands in for onnxruntime.InferenceSession (a seam): records how the engine builds its session."""

    calls: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, path: str, options: ort.SessionOptions, **kwargs: Any) -> None:
        CapturedSession.calls.append({"path": path, "options": options, **kwargs})
        self._providers = kwargs["providers"]

    def get_inputs(self) -> list[Any]:
        return [types.SimpleNamespace(name="pixels", type="tensor(float)")]

    def get_providers(self) -> list[str]:
        return self._providers


@pytest.fixture
def captured(monkeypatch) -> list[dict[str, Any]]:
    CapturedSession.calls = []
    monkeypatch.setattr(ort, "InferenceSession", CapturedSession)
    return CapturedSession.calls


@pytest.mark.parametrize("precision,disabled", [("fp16", ["NchwcTransformer"]), ("fp32", None), ("int8", None)])
def test_fp16_graphs_on_cpu_disable_the_nchwc_transformer(captured, precision, disabled):
    OnnxRuntimeEngine(DEMO_DIR / "image.onnx", "image", precision=precision, intra_op_threads=2)
    (call,) = captured
    assert call.get("disabled_optimizers") == disabled
    assert call["providers"] == [CPU]
    assert call["options"].intra_op_num_threads == 2


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_tensorrt_provider_gets_fp16_flag_and_a_cache_beside_the_model(captured, monkeypatch, tmp_path, precision):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    graph = Path(shutil.copy(DEMO_DIR / "image.onnx", tmp_path / "image.onnx"))  # the cache dir is made beside it
    engine = OnnxRuntimeEngine(graph, "image", precision=precision)
    (call,) = captured
    assert call["providers"] == [TRT, CUDA, CPU]
    trt_options, cuda_options, cpu_options = call["provider_options"]
    assert trt_options["trt_fp16_enable"] is (precision == "fp16")
    assert trt_options["trt_engine_cache_enable"] is True
    assert Path(trt_options["trt_engine_cache_path"]) == tmp_path / "ort-tensorrt-cache"
    assert (tmp_path / "ort-tensorrt-cache").is_dir()
    assert cuda_options == cpu_options == {}
    assert engine.description == f"onnxruntime {TRT} {precision} image.onnx"


# ----------------------------------------------------------------------------------------------- factory


@pytest.mark.parametrize("precision,suffix", [("fp32", ".onnx"), ("int8", ".int8.onnx")])
def test_factory_builds_onnxruntime_engines_of_the_configured_precision(manifest, precision, suffix):
    pair = build_engines(Settings(engine="onnxruntime", precision=precision), manifest, DEMO_DIR)
    try:
        assert pair.image.role == "image" and pair.text.role == "text"
        assert pair.image.description == f"onnxruntime {CPU} {precision} image{suffix}"
        assert pair.text.description == f"onnxruntime {CPU} {precision} text{suffix}"
        warm_up(pair, manifest)
    finally:
        pair.close()


def test_factory_refuses_a_precision_that_was_not_exported(manifest):
    with pytest.raises(EngineError, match=r"no fp16 ONNX graphs.*\['fp32', 'int8'\]"):
        build_engines(Settings(engine="onnxruntime", precision="fp16"), manifest, DEMO_DIR)


def test_factory_passes_unavailable_providers_up_as_an_engine_error(manifest):
    with pytest.raises(EngineError, match="not available"):
        build_engines(Settings(onnx_providers=[CUDA]), manifest, DEMO_DIR)


class StubEngine:
    """A misbehaving engine: returns whatever it is told to, whatever it is given."""

    max_batch_size = None

    def __init__(self, role: str, output: np.ndarray) -> None:
        self.role, self.description, self._output = role, f"stub {role}", output

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        return self._output

    def close(self) -> None:
        pass


def _unit(dim: int) -> np.ndarray:
    return np.eye(1, dim, dtype=np.float32)


@pytest.mark.parametrize(
    "image_output,message",
    [
        (np.ones((1, 32), np.float32) / np.sqrt(32), r"stub image: output shape \(1, 32\), expected \(1, 64\)"),
        (np.ones((2, 64), np.float32) / 8, r"output shape \(2, 64\)"),
        (np.zeros((1, 64), np.float32), "unit vector, got norm 0"),
        (np.full((1, 64), np.nan, np.float32), "unit vector"),
    ],
)
def test_warm_up_fails_clearly_on_wrong_outputs(manifest, image_output, message):
    pair = EnginePair(image=StubEngine("image", image_output), text=StubEngine("text", _unit(64)))
    with pytest.raises(EngineError, match=message):
        warm_up(pair, manifest)


def test_warm_up_wraps_a_runtime_failure(manifest):
    class Broken(StubEngine):
        def __call__(self, inputs: np.ndarray) -> np.ndarray:
            raise RuntimeError("CUDA error: an illegal memory access")

    pair = EnginePair(image=StubEngine("image", _unit(64)), text=Broken("text", _unit(64)))
    with pytest.raises(EngineError, match="warm-up of stub text failed: CUDA error"):
        warm_up(pair, manifest)


def test_warm_up_feeds_the_shapes_and_tokens_of_the_manifest(manifest):
    seen: dict[str, np.ndarray] = {}

    class Recording(StubEngine):
        def __call__(self, inputs: np.ndarray) -> np.ndarray:
            seen[self.role] = inputs
            return self._output

    warm_up(EnginePair(Recording("image", _unit(64)), Recording("text", _unit(64))), manifest)
    assert seen["image"].shape == (1, 3, 64, 64) and seen["image"].dtype == np.float32
    assert seen["text"].shape == (1, 32) and seen["text"].dtype == np.int64
    assert seen["text"][0, :3].tolist() == [49406, 49407, 0]


# ------------------------------------------------------------------------------------------------- torch


@pytest.fixture(scope="module")
def torch_engines_module():
    pytest.importorskip("torch")
    pytest.importorskip("open_clip")
    from service.engines import torch as torch_engines

    return torch_engines


def test_torch_engine_equals_the_onnx_fp32_engine(torch_engines_module, manifest, ort_engines, pixels, token_ids):
    image, text = torch_engines_module.load_torch_engines(manifest, Settings(engine="torch"))
    assert isinstance(image, torch_engines_module.TorchEngine)
    assert image.description.startswith("torch ") and "fp32" in image.description
    for engine in (image, text):
        inputs = inputs_for(engine.role, pixels, token_ids)
        out = engine(inputs)
        assert out.dtype == np.float32 and out.shape == (len(inputs), 64)
        np.testing.assert_allclose(out, ort_engines[engine.role, "fp32"](inputs), rtol=0, atol=1e-5)


def test_factory_builds_torch_engines_from_the_demo_manifest(torch_engines_module, manifest):
    pair = build_engines(Settings(engine="torch"), manifest, DEMO_DIR)
    warm_up(pair, manifest)
    pair.close()
    with pytest.raises(EngineError, match="closed"):
        pair.image(np.zeros((1, 3, 64, 64), np.float32))


def test_torch_model_setting_overrides_the_manifest_source(torch_engines_module, manifest):
    source = manifest.source.model_copy(update={"kind": "hf_clip", "sha256": None})
    image, _ = torch_engines_module.load_torch_engines(
        manifest.model_copy(update={"source": source}), Settings(engine="torch", torch_model="demo")
    )
    assert "clipserve-demo" in image.description


def test_torch_refuses_weights_other_than_the_exported_ones(torch_engines_module, manifest):
    tampered = manifest.model_copy(update={"source": manifest.source.model_copy(update={"sha256": "0" * 64})})
    with pytest.raises(EngineError, match="the weights differ from the ones the graphs were exported from"):
        torch_engines_module.load_torch_engines(tampered, Settings(engine="torch"))


def test_torch_without_known_weights_asks_for_clipserve_torch_model(torch_engines_module, manifest):
    source = manifest.source.model_copy(update={"kind": "open_clip_checkpoint"})
    with pytest.raises(EngineError, match="CLIPSERVE_TORCH_MODEL"):
        torch_engines_module.load_torch_engines(manifest.model_copy(update={"source": source}), Settings())


# --------------------------------------------------------------------------------------------- TensorRT
# faked: TensorRT cannot be installed on this machine (tests/service/fake_tensorrt.py says how).


@pytest.fixture
def device_memory() -> FakeDeviceMemory:
    return FakeDeviceMemory()


@pytest.fixture
def fake_trt(monkeypatch, device_memory) -> types.ModuleType:
    trt = make_fake_tensorrt(device_memory)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


def trt_build(directory: str, compute_capability: str, version: str = "10.7.0") -> TensorRTBuild:
    return TensorRTBuild(
        directory=directory,
        gpu_name="NVIDIA H100" if compute_capability == "9.0" else "NVIDIA L4",
        compute_capability=compute_capability,
        tensorrt_version=version,
        precision="fp16",
        min_batch=1,
        opt_batch=4,
        max_batch=8,
    )


def test_select_build_picks_the_build_for_this_gpu_and_tensorrt(manifest):
    builds = (trt_build("tensorrt/sm89-trt10.7.0", "8.9"), trt_build("tensorrt/sm90-trt10.7.0", "9.0"))
    with_builds = manifest.model_copy(update={"tensorrt": builds})
    assert select_build(with_builds, "9.0", "10.7.0") is builds[1]
    assert select_build(with_builds, "8.9", "10.7.0") is builds[0]


def test_select_build_explains_a_gpu_or_version_mismatch(manifest):
    with_builds = manifest.model_copy(update={"tensorrt": (trt_build("tensorrt/sm90-trt10.7.0", "9.0"),)})
    for capability, version in (("8.6", "10.7.0"), ("9.0", "10.3.0")):
        with pytest.raises(EngineError) as caught:
            select_build(with_builds, capability, version)
        message = str(caught.value)
        assert f"compute capability {capability}" in message and f"TensorRT {version}" in message
        assert "tensorrt/sm90-trt10.7.0 (NVIDIA H100, compute capability 9.0, TensorRT 10.7.0" in message
        assert "only valid on the GPU family they were built for" in message
        assert "--formats tensorrt" in message and "CLIPSERVE_ENGINE=onnxruntime" in message


def test_select_build_without_any_build_says_none(manifest):
    with pytest.raises(EngineError, match="builds in the manifest: none"):
        select_build(manifest, "9.0", "10.7.0")


def test_tensorrt_engine_runs_the_context_with_the_batch_shape(fake_trt, device_memory, tmp_path, pixels):
    plan = write_plan(tmp_path / "tensorrt/sm90-trt10.7.0/image.plan", "pixels")
    engine = TensorRTEngine(plan, "image", input_name="pixels", max_batch_size=8, memory=device_memory)
    out = engine(pixels)
    np.testing.assert_array_equal(out, fake_embed(pixels))
    assert out.dtype == np.float32 and out.shape == (5, EMBED_DIM)
    (context,) = fake_trt.engines[0].contexts
    assert context.shapes == [("pixels", (5, 3, 64, 64))]
    assert context.streams == [device_memory.stream_handle]
    assert set(context.addresses) == {"pixels", "embeddings"}
    assert engine.description == "tensorrt 10.7.0 fp32 sm90-trt10.7.0/image.plan"  # the default precision
    assert engine.max_batch_size == 8


def test_tensorrt_engine_reuses_its_device_buffers_and_grows_them_when_needed(fake_trt, device_memory, tmp_path):
    plan = write_plan(tmp_path / "image.plan", "pixels")
    engine = TensorRTEngine(plan, "image", input_name="pixels", max_batch_size=8, memory=device_memory)
    first = np.random.default_rng(0).random((4, 3, 8, 8), dtype=np.float32)
    np.testing.assert_array_equal(engine(first), fake_embed(first))
    slots = dict(device_memory.slots)
    np.testing.assert_array_equal(engine(first[:2]), fake_embed(first[:2]))  # smaller: same buffers
    assert device_memory.slots == slots
    bigger = np.concatenate([first, first[::-1]])
    np.testing.assert_array_equal(engine(bigger), fake_embed(bigger))  # larger: new buffers, right answers
    assert device_memory.slots != slots and len(device_memory.buffers) == 2
    engine.close()
    assert device_memory.closed


def test_tensorrt_engine_refuses_a_batch_above_the_profile_max(fake_trt, device_memory, tmp_path):
    """The batcher sends at most max_batch_size rows; a larger batch is an error, not split into chunks here."""
    plan = write_plan(tmp_path / "text.plan", "token_ids", "INT64")
    engine = TensorRTEngine(plan, "text", input_name="token_ids", max_batch_size=8, memory=device_memory)
    ids = np.arange(10 * 32, dtype=np.int64).reshape(10, 32) % 49408
    with pytest.raises(EngineError, match=r"input shape \(10, 32\) is outside .*profile \(its max batch is 8\)"):
        engine(ids)
    (context,) = fake_trt.engines[0].contexts
    assert context.streams == []  # nothing was enqueued
    np.testing.assert_array_equal(engine(ids[:8]), fake_embed(ids[:8]))


def test_tensorrt_engine_casts_inputs_to_the_engine_dtype(fake_trt, device_memory, tmp_path):
    plan = write_plan(tmp_path / "text.plan", "token_ids", "INT32")
    engine = TensorRTEngine(plan, "text", input_name="token_ids", max_batch_size=8, memory=device_memory)
    ids = np.arange(64, dtype=np.int64).reshape(2, 32)
    np.testing.assert_array_equal(engine(ids), fake_embed(ids))  # the fake reads the input bytes as int32
    assert len(device_memory.buffers[device_memory.slots["input"]]) == ids.size * 4


def test_tensorrt_engine_refuses_a_plan_it_cannot_deserialize(fake_trt, device_memory, tmp_path):
    plan = tmp_path / "image.plan"
    plan.write_bytes(b"built on another GPU")
    with pytest.raises(EngineError, match=r"could not deserialize .*GPU family and TensorRT version"):
        TensorRTEngine(plan, "image", input_name="pixels", max_batch_size=8, memory=device_memory)


def test_tensorrt_engine_checks_the_input_name(fake_trt, device_memory, tmp_path):
    plan = write_plan(tmp_path / "image.plan", "input")
    with pytest.raises(EngineError, match="expected one input 'pixels'"):
        TensorRTEngine(plan, "image", input_name="pixels", max_batch_size=8, memory=device_memory)


def test_tensorrt_engine_refuses_shapes_outside_the_profile_and_calls_after_close(fake_trt, device_memory, tmp_path):
    plan = write_plan(tmp_path / "image.plan", "pixels")
    engine = TensorRTEngine(plan, "image", input_name="pixels", max_batch_size=8, memory=device_memory)
    with pytest.raises(EngineError, match="outside the engine's optimisation profile"):
        engine(np.zeros((0, 3, 64, 64), np.float32))
    engine.close()
    with pytest.raises(EngineError, match="closed"):
        engine(np.zeros((1, 3, 64, 64), np.float32))


def test_missing_tensorrt_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now fails, as on a machine without it
    plan = write_plan(tmp_path / "image.plan", "pixels")
    with pytest.raises(EngineError, match=r"pip install 'clipserve\[gpu\]'"):
        TensorRTEngine(plan, "image", input_name="pixels", max_batch_size=8, memory=FakeDeviceMemory())
    with pytest.raises(EngineError, match=r"clipserve\[gpu\]"):
        build_engines(Settings(engine="tensorrt"), load_manifest(DEMO_DIR, verify=False), DEMO_DIR)


def test_factory_builds_tensorrt_engines_from_the_matching_build(
    fake_trt, device_memory, monkeypatch, manifest, tmp_path
):
    builds = (trt_build("tensorrt/sm89-trt10.7.0", "8.9"), trt_build("tensorrt/sm90-trt10.7.0", "9.0"))
    plans = []
    for build in builds:
        for role, name, dtype in (("image", "pixels", "FLOAT"), ("text", "token_ids", "INT64")):
            relative = f"{build.directory}/{role}.plan"
            write_plan(tmp_path / relative, name, dtype)
            plans.append(
                Artifact(path=relative, role=role, format="tensorrt", precision="fp16", sha256="0" * 64, bytes=1)
            )
    with_plans = manifest.model_copy(update={"tensorrt": builds, "artifacts": (*manifest.artifacts, *plans)})
    monkeypatch.setattr(cuda_runtime, "compute_capability", lambda device=0: "9.0")
    monkeypatch.setattr(trt_engines, "CudaRuntimeMemory", lambda: device_memory)

    pair = build_engines(Settings(engine="tensorrt", max_batch_size=64), with_plans, tmp_path)
    assert pair.image.description == "tensorrt 10.7.0 fp16 sm90-trt10.7.0/image.plan"
    assert pair.text.description == "tensorrt 10.7.0 fp16 sm90-trt10.7.0/text.plan"
    assert pair.text.precision == "fp16"  # the build's, whatever CLIPSERVE_PRECISION says: the label cache keys it
    assert pair.image.max_batch_size == pair.text.max_batch_size == 8
    warm_up(pair, with_plans)
    assert [engine.input for engine in fake_trt.engines] == ["pixels", "token_ids"]

    monkeypatch.setattr(cuda_runtime, "compute_capability", lambda device=0: "8.6")
    with pytest.raises(EngineError, match="only valid on the GPU family"):
        build_engines(Settings(engine="tensorrt"), with_plans, tmp_path)


class FakeCudart:
    """faked: no GPU here. The slice of `cuda.bindings.runtime` that CudaRuntimeMemory calls, with the same
    `(error, *values)` returns, on host memory (ctypes buffers stand in for device allocations)."""

    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2
        cudaErrorInsufficientDriver = 35
        cudaErrorNoDevice = 100

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.allocations: dict[int, ctypes.Array] = {}
        self.out_of_memory = False
        ok = self.cudaError_t.cudaSuccess
        self.cudaSetDevice = self._logged("cudaSetDevice", lambda device: (ok,))
        self.cudaStreamCreate = self._logged("cudaStreamCreate", lambda: (ok, 77))
        self.cudaStreamSynchronize = self._logged("cudaStreamSynchronize", lambda stream: (ok,))
        self.cudaStreamDestroy = self._logged("cudaStreamDestroy", lambda stream: (ok,))
        self.cudaFree = self._logged("cudaFree", lambda address: (ok, self.allocations.pop(address))[:1])
        self.cudaMemcpyAsync = self._logged("cudaMemcpyAsync", self._memcpy)
        self.cudaMalloc = self._logged("cudaMalloc", self._malloc)
        self.cudaRuntimeGetVersion = lambda: (ok, 12040)
        self.cudaDriverGetVersion = lambda: (ok, 0)

    def _logged(self, name: str, call):
        def logged(*args):
            self.calls.append((name, *args))
            return call(*args)

        return logged

    def _malloc(self, nbytes: int) -> tuple:
        if self.out_of_memory:
            return (self.cudaError_t.cudaErrorMemoryAllocation, 0)
        buffer = ctypes.create_string_buffer(nbytes)
        self.allocations[ctypes.addressof(buffer)] = buffer
        return (self.cudaError_t.cudaSuccess, ctypes.addressof(buffer))

    def _memcpy(self, destination: int, source: int, count: int, kind, stream) -> tuple:
        ctypes.memmove(destination, source, count)
        return (self.cudaError_t.cudaSuccess,)

    def cudaGetErrorName(self, error) -> tuple:
        return (self.cudaError_t.cudaSuccess, error.name.encode())

    def cudaGetErrorString(self, error) -> tuple:
        return (self.cudaError_t.cudaSuccess, b"out of memory")

    def names(self) -> list[str]:
        return [call[0] for call in self.calls]


@pytest.fixture
def fake_cudart(monkeypatch) -> FakeCudart:
    cudart = FakeCudart()
    monkeypatch.setattr(cuda_runtime, "load_cudart", lambda: cudart)
    return cudart


def test_cuda_memory_reuses_buffers_and_frees_the_old_one_only_after_the_stream_is_done(fake_cudart):
    memory = cuda_runtime.CudaRuntimeMemory()
    assert memory.stream_handle == 77
    first = memory.buffer("input", 64)
    assert memory.buffer("input", 32) == first and fake_cudart.names().count("cudaMalloc") == 1  # reused
    host = np.arange(16, dtype=np.float32)
    memory.copy_in(first, host)
    back = np.zeros_like(host)
    memory.copy_out(first, back)
    np.testing.assert_array_equal(back, host)
    assert fake_cudart.names()[-2:] == ["cudaMemcpyAsync", "cudaStreamSynchronize"]  # copy_out waits for it

    fake_cudart.calls.clear()
    grown = memory.buffer("input", 128)
    assert fake_cudart.calls == [("cudaStreamSynchronize", 77), ("cudaFree", first), ("cudaMalloc", 128)]
    output = memory.buffer("output", 8)
    fake_cudart.calls.clear()
    memory.close()
    assert fake_cudart.names() == ["cudaStreamSynchronize", "cudaFree", "cudaFree", "cudaStreamDestroy"]
    assert sorted(call[1] for call in fake_cudart.calls if call[0] == "cudaFree") == sorted([grown, output])
    assert fake_cudart.allocations == {}  # everything handed back
    memory.close()
    assert fake_cudart.names().count("cudaStreamDestroy") == 1  # a second close does nothing


def test_cuda_errors_name_the_call_and_cuda_s_reason(fake_cudart):
    memory = cuda_runtime.CudaRuntimeMemory()
    fake_cudart.out_of_memory = True
    with pytest.raises(EngineError, match=r"CUDA cudaMalloc failed: cudaErrorMemoryAllocation \(out of memory\)$"):
        memory.buffer("input", 1 << 40)


def test_a_tensorrt_engine_that_fails_to_load_closes_its_memory(fake_trt, device_memory, tmp_path):
    plan = tmp_path / "image.plan"
    plan.write_bytes(b"built on another GPU")
    with pytest.raises(EngineError, match="could not deserialize"):
        TensorRTEngine(plan, "image", input_name="pixels", max_batch_size=8, memory=device_memory)
    assert device_memory.closed


def test_cuda_memory_without_the_bindings_says_how_to_install_them(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)  # `from cuda.bindings import runtime` now fails
    for call in (cuda_runtime.CudaRuntimeMemory, cuda_runtime.compute_capability):
        with pytest.raises(EngineError, match=r"cuda-bindings.*pip install 'clipserve\[gpu\]'"):
            call()


def test_cuda_memory_on_the_real_cuda_runtime():
    """Real cuda-bindings (a dev dependency), real CUDA runtime: a round trip through device memory where a GPU is
    visible (the GPU check); elsewhere, as on CI, the clear error the service would log instead of a crash."""
    pytest.importorskip("cuda.bindings.runtime")
    try:
        memory = cuda_runtime.CudaRuntimeMemory()
    except EngineError as error:
        message = str(error)
        assert message.startswith("CUDA cudaSetDevice failed: cudaError") and "CLIPSERVE_ENGINE=onnxruntime" in message
        with pytest.raises(EngineError, match="cudaDeviceGetAttribute failed"):
            cuda_runtime.compute_capability()
        return
    try:
        assert float(cuda_runtime.compute_capability()) >= 3.0
        host = np.random.default_rng(0).random((3, 5), dtype=np.float32)
        address = memory.buffer("input", host.nbytes)
        assert memory.buffer("input", host.nbytes // 2) == address  # reused, not reallocated
        memory.copy_in(address, host)
        back = np.empty_like(host)
        memory.copy_out(address, back)
        np.testing.assert_array_equal(back, host)
        grown = memory.buffer("input", host.nbytes * 1000)
        memory.copy_in(grown, host)
        memory.copy_out(grown, back)
        np.testing.assert_array_equal(back, host)
    finally:
        memory.close()
        memory.close()  # twice is harmless


# ------------------------------------------------------------------------------------------ torch-free


def test_onnxruntime_and_factory_import_without_torch_or_tensorrt():
    modules = ["service.engines.onnxruntime", "service.engines.factory", "service.engines.tensorrt"]
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in ("torch", "tensorrt"))
    imports = "; ".join(f"import {module}" for module in modules)
    checks = {
        # A None entry in sys.modules makes `import torch` fail, as on the slim install.
        f"import sys; {blocked}; {imports}; print('ok')": "ok",
        f"import sys; {imports}; print([m for m in ('torch', 'tensorrt') if m in sys.modules])": "[]",
    }
    for code, expected in checks.items():
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected


def test_an_install_without_onnxruntime_names_the_extra_to_install(monkeypatch):
    """`pip install clipserve` without `[cpu]` or `[gpu]` has no ONNX Runtime: say which extra, not ImportError."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # importing it now raises ImportError(name="onnxruntime")
    monkeypatch.delitem(sys.modules, "service.engines.onnxruntime", raising=False)
    manifest = load_manifest(REPOSITORY_DIR / EXPORT_NAME)
    with pytest.raises(EngineError, match=r"pip install 'clipserve\[cpu\]'"):
        build_engines(Settings(), manifest, REPOSITORY_DIR / EXPORT_NAME)
