"""Tests for export/tensorrt_build.py against a FAKE tensorrt module.

TensorRT cannot be installed on this machine (no NVIDIA GPU, no access to NVIDIA's package host), so these tests
never touch the real library. `FakeTensorRT` mimics the slice of the TensorRT 10 Python API the builder uses
(Logger, Builder, OnnxParser, IBuilderConfig, optimization profiles, timing caches) and records every call, so the
tests check that the builder drives that API as NVIDIA documents it: network flags, the parsed file, builder flags,
profile shapes, memory pool limits, timing cache bytes in and out, and the plan bytes written. They cannot show
that a real TensorRT accepts the graphs or that the plans run; that needs a GPU machine.
"""

from __future__ import annotations

import enum
import sys
import types
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper

from export.tensorrt_build import (
    BuiltEngine,
    EngineBuild,
    EngineBuildError,
    EngineSpec,
    GpuInfo,
    NoGpuError,
    ProfileShapes,
    build_engine,
    build_engines,
    current_gpu,
    engine_directory,
    precision_flags,
    profile_shapes,
)

H200 = GpuInfo(name="NVIDIA H200", compute_capability="9.0")
T4 = GpuInfo(name="Tesla T4", compute_capability="7.5")
IMAGE_SHAPE = (3, 224, 224)
TEXT_SHAPE = (77,)


# --- the fake ------------------------------------------------------------------------------------------------------


class FakeLogger:
    WARNING = "WARNING"
    INFO = "INFO"

    def __init__(self, severity: str) -> None:
        self.severity = severity


class FakeTensor:
    def __init__(self, name: str) -> None:
        self.name = name


class FakeNetwork:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.inputs: list[FakeTensor] = []
        self.source = ""

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, index: int) -> FakeTensor:
        return self.inputs[index]


class FakeParserError:
    def __init__(self, message: str) -> None:
        self.message = message

    def __str__(self) -> str:
        return self.message


class FakeOnnxParser:
    def __init__(self, fake: FakeTensorRT, network: FakeNetwork, logger: FakeLogger) -> None:
        self.fake = fake
        self.network = network
        self.errors: list[FakeParserError] = []

    def parse_from_file(self, model: str) -> bool:
        self.fake.parsed_files.append(model)
        if self.fake.parse_errors:
            self.errors = [FakeParserError(message) for message in self.fake.parse_errors]
            return False
        # Read the real graph inputs, so a wrong input name is caught the way the real parser would expose it.
        graph = onnx.load(model).graph
        initializers = {init.name for init in graph.initializer}
        self.network.inputs = [FakeTensor(i.name) for i in graph.input if i.name not in initializers]
        self.network.source = model
        return True

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> FakeParserError:
        return self.errors[index]


class FakeProfile:
    def __init__(self, fake: FakeTensorRT) -> None:
        self.fake = fake

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:
        self.fake.profile_shapes.append((input, tuple(min), tuple(opt), tuple(max)))


class FakeTimingCache:
    def __init__(self, data: bytes, returned: list[bytes]) -> None:
        self.data = data
        self.returned = returned

    def serialize(self) -> memoryview:
        # The real serialize() returns an IHostMemory (a buffer, not bytes); a memoryview behaves the same way.
        serialized = bytes(self.data)
        self.returned.append(serialized)
        return memoryview(serialized)


class FakeConfig:
    def __init__(self, fake: FakeTensorRT) -> None:
        self.fake = fake
        self.flags: list[Any] = []
        self.profiles: list[FakeProfile] = []
        self.timing_cache: FakeTimingCache | None = None

    def set_memory_pool_limit(self, pool: Any, pool_size: int) -> None:
        self.fake.memory_pool_limits.append((pool, pool_size))

    def set_flag(self, flag: Any) -> None:
        self.flags.append(flag)
        self.fake.flags_set.append(flag)

    def add_optimization_profile(self, profile: FakeProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, serialized_timing_cache: Any) -> FakeTimingCache:
        data = bytes(serialized_timing_cache)
        self.fake.timing_cache_given.append(data)
        return FakeTimingCache(data, self.fake.timing_cache_returned)

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        self.fake.timing_cache_ignore_mismatch.append(ignore_mismatch)
        # The real header check: a cache timed on another device is refused unless ignore_mismatch is True.
        if cache.data.startswith(b"other-gpu") and not ignore_mismatch:
            return False
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> FakeTimingCache | None:
        return self.timing_cache


class FakeBuilder:
    def __init__(self, fake: FakeTensorRT, logger: FakeLogger) -> None:
        self.fake = fake
        self.logger = logger
        fake.builder_loggers.append(logger)

    @property
    def platform_has_fast_fp16(self) -> bool:
        return self.fake.fast_fp16

    def create_network(self, flags: int = 0) -> FakeNetwork:
        self.fake.network_flags.append(flags)
        return FakeNetwork(flags)

    def create_builder_config(self) -> FakeConfig:
        config = FakeConfig(self.fake)
        self.fake.configs.append(config)
        return config

    def create_optimization_profile(self) -> FakeProfile:
        return FakeProfile(self.fake)

    def build_serialized_network(self, network: FakeNetwork, config: FakeConfig) -> memoryview | None:
        self.fake.builds += 1
        if self.fake.build_returns_none:
            return None
        name = Path(network.source).name
        if config.timing_cache is not None:
            # Building adds the tactics it timed to the attached cache.
            config.timing_cache.data += f"[timed {name}]".encode()
        plan = f"FAKE-PLAN {name} flags={sorted(f.name for f in config.flags)}".encode()
        self.fake.serialized.append(plan)
        return memoryview(plan)


class FakeTensorRT:
    """faked: TensorRT cannot be installed on this machine.

    A stand-in for the ``tensorrt`` module with the attributes export/tensorrt_build.py uses, recording each call.
    `fast_fp16=False` models a GPU without fast fp16.
    """

    def __init__(
        self,
        *,
        version: str = "10.7.0",
        fast_fp16: bool = True,
        parse_errors: tuple[str, ...] = (),
        build_returns_none: bool = False,
    ) -> None:
        self.__version__ = version
        self.fast_fp16 = fast_fp16
        self.parse_errors = parse_errors
        self.build_returns_none = build_returns_none
        self.BuilderFlag: Any = enum.Enum("BuilderFlag", ["FP16", "BF16", "INT8", "TF32"])
        self.MemoryPoolType: Any = enum.Enum("MemoryPoolType", ["WORKSPACE", "TACTIC_SHARED_MEMORY"])
        self.Logger = FakeLogger

        self.builder_loggers: list[FakeLogger] = []
        self.network_flags: list[int] = []
        self.parsed_files: list[str] = []
        self.configs: list[FakeConfig] = []
        self.flags_set: list[Any] = []
        self.profile_shapes: list[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = []
        self.memory_pool_limits: list[tuple[Any, int]] = []
        self.timing_cache_given: list[bytes] = []
        self.timing_cache_returned: list[bytes] = []
        self.timing_cache_ignore_mismatch: list[bool] = []
        self.serialized: list[bytes] = []
        self.builds = 0

    def Builder(self, logger: FakeLogger) -> FakeBuilder:  # mirrors trt.Builder
        return FakeBuilder(self, logger)

    def OnnxParser(self, network: FakeNetwork, logger: FakeLogger) -> FakeOnnxParser:  # mirrors trt.OnnxParser
        return FakeOnnxParser(self, network, logger)


# --- fixtures ------------------------------------------------------------------------------------------------------


def _write_identity_onnx(path: Path, input_name: str, elem_type: int, shape: list[Any]) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Identity", [input_name], ["out"])],
        path.stem,
        [helper.make_tensor_value_info(input_name, elem_type, shape)],
        [helper.make_tensor_value_info("out", elem_type, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture
def specs(tmp_path: Path) -> tuple[EngineSpec, EngineSpec]:
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    image = _write_identity_onnx(onnx_dir / "image.onnx", "pixels", TensorProto.FLOAT, ["batch", *IMAGE_SHAPE])
    text = _write_identity_onnx(onnx_dir / "text.onnx", "token_ids", TensorProto.INT64, ["batch", *TEXT_SHAPE])
    return (
        EngineSpec(role="image", onnx_path=image, input_name="pixels", sample_shape=IMAGE_SHAPE),
        EngineSpec(role="text", onnx_path=text, input_name="token_ids", sample_shape=TEXT_SHAPE),
    )


@pytest.fixture
def image_spec(specs: tuple[EngineSpec, EngineSpec]) -> EngineSpec:
    return specs[0]


def _build_one(fake: FakeTensorRT, spec: EngineSpec, tmp_path: Path, **kwargs: Any) -> BuiltEngine:
    options: dict[str, Any] = {
        "precision": "fp16",
        "shapes": profile_shapes(spec.sample_shape, opt_batch=8, max_batch=32),
        "timing_cache_path": None,
        "gpu": H200,
    }
    options.update(kwargs)
    return build_engine(fake, spec, tmp_path / "out" / f"{spec.role}.plan", **options)


# --- GPU, directories, profiles ------------------------------------------------------------------------------------


def test_gpu_arch_is_sm_plus_compute_capability_digits():
    assert GpuInfo("NVIDIA A10", "8.6").arch == "sm86"
    assert H200.arch == "sm90"
    assert GpuInfo("NVIDIA RTX PRO 6000", "12.0").arch == "sm120"


def test_gpu_rejects_malformed_compute_capability():
    with pytest.raises(ValueError, match="compute capability"):
        GpuInfo("x", "sm90")


def test_engine_directory_names_gpu_family_and_tensorrt_version():
    assert engine_directory(H200, "10.7.0") == "tensorrt/sm90-trt10.7.0"
    with pytest.raises(ValueError):
        engine_directory(H200, "")


def test_profile_shapes_for_image_and_text_inputs():
    assert profile_shapes(IMAGE_SHAPE, min_batch=1, opt_batch=8, max_batch=64) == ProfileShapes(
        min=(1, 3, 224, 224), opt=(8, 3, 224, 224), max=(64, 3, 224, 224)
    )
    assert profile_shapes(TEXT_SHAPE, min_batch=2, opt_batch=16, max_batch=16) == ProfileShapes(
        min=(2, 77), opt=(16, 77), max=(16, 77)
    )


@pytest.mark.parametrize(
    ("min_batch", "opt_batch", "max_batch", "message"),
    [
        (0, 8, 32, "min_batch must be at least 1"),
        (4, 2, 32, r"opt_batch \(2\) must be >= min_batch \(4\)"),
        (1, 64, 32, r"max_batch \(32\) must be >= opt_batch \(64\)"),
    ],
)
def test_profile_shapes_rejects_bad_batch_order(min_batch: int, opt_batch: int, max_batch: int, message: str):
    with pytest.raises(ValueError, match=message):
        profile_shapes(IMAGE_SHAPE, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch)


def test_profile_shapes_rejects_non_positive_sample_dims():
    with pytest.raises(ValueError, match="sample shape"):
        profile_shapes((3, 0, 224), opt_batch=1, max_batch=1)


# --- precision flags -----------------------------------------------------------------------------------------------


def test_fp32_sets_no_flags():
    fake = FakeTensorRT()
    assert precision_flags(fake, fake.Builder(FakeLogger("WARNING")), "fp32") == []


def test_fp16_sets_fp16_flag():
    fake = FakeTensorRT()
    assert precision_flags(fake, fake.Builder(FakeLogger("WARNING")), "fp16", H200) == [fake.BuilderFlag.FP16]


def test_fp16_refused_without_fast_fp16():
    fake = FakeTensorRT(fast_fp16=False)
    with pytest.raises(ValueError, match="platform_has_fast_fp16"):
        precision_flags(fake, fake.Builder(FakeLogger("WARNING")), "fp16")


def test_fp16_refused_when_tensorrt_has_no_fp16_flag():
    fake = FakeTensorRT(version="11.0.0")
    fake.BuilderFlag = enum.Enum("BuilderFlag", ["TF32"])  # TensorRT 11 removed the weak-typing flags
    with pytest.raises(ValueError, match=r"BuilderFlag\.FP16"):
        precision_flags(fake, fake.Builder(FakeLogger("WARNING")), "fp16")


def test_bf16_sets_bf16_flag_on_ampere_or_newer():
    fake = FakeTensorRT()
    builder = fake.Builder(FakeLogger("WARNING"))
    assert precision_flags(fake, builder, "bf16", H200) == [fake.BuilderFlag.BF16]
    assert precision_flags(fake, builder, "bf16", GpuInfo("NVIDIA A100", "8.0")) == [fake.BuilderFlag.BF16]


def test_bf16_refused_when_tensorrt_has_no_bf16_flag():
    fake = FakeTensorRT(version="11.0.0")
    fake.BuilderFlag = enum.Enum("BuilderFlag", ["TF32"])  # TensorRT 11 removed the weak-typing flags
    with pytest.raises(ValueError, match=r"BuilderFlag\.BF16"):
        precision_flags(fake, fake.Builder(FakeLogger("WARNING")), "bf16", H200)


def test_bf16_refused_before_ampere():
    fake = FakeTensorRT()
    with pytest.raises(ValueError, match=r"compute capability >= 8\.0.*Tesla T4.*7\.5"):
        precision_flags(fake, fake.Builder(FakeLogger("WARNING")), "bf16", T4)


def test_unknown_precision_refused():
    fake = FakeTensorRT()
    with pytest.raises(ValueError, match="unknown TensorRT precision 'int8'"):
        precision_flags(fake, fake.Builder(FakeLogger("WARNING")), "int8")


# --- build_engine --------------------------------------------------------------------------------------------------


def test_build_engine_drives_the_tensorrt_api(image_spec: EngineSpec, tmp_path: Path):
    fake = FakeTensorRT()
    built = _build_one(fake, image_spec, tmp_path, workspace_bytes=2 << 30)

    assert fake.network_flags == [0]  # TensorRT 10: explicit batch is the only mode, no flag
    assert fake.parsed_files == [str(image_spec.onnx_path)]
    assert fake.builder_loggers[0].severity == FakeLogger.WARNING
    assert fake.flags_set == [fake.BuilderFlag.FP16]
    assert fake.memory_pool_limits == [(fake.MemoryPoolType.WORKSPACE, 2 << 30)]
    assert fake.profile_shapes == [("pixels", (1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))]
    assert len(fake.configs[0].profiles) == 1
    assert fake.timing_cache_given == []  # no timing cache path, no timing cache calls

    assert built.role == "image"
    assert built.plan_path.is_absolute()
    assert built.plan_path.read_bytes() == fake.serialized[0]
    assert built.profile == ProfileShapes((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))
    assert built.build_seconds >= 0
    assert not list(built.plan_path.parent.glob(".*.tmp"))


def test_text_engine_profile_varies_only_batch(specs: tuple[EngineSpec, EngineSpec], tmp_path: Path):
    fake = FakeTensorRT()
    text = specs[1]
    _build_one(fake, text, tmp_path, precision="fp32", shapes=profile_shapes(TEXT_SHAPE, opt_batch=4, max_batch=16))
    assert fake.profile_shapes == [("token_ids", (1, 77), (4, 77), (16, 77))]
    assert fake.flags_set == []
    assert fake.memory_pool_limits == []  # left to TensorRT's default when not given


def test_fp16_without_fast_fp16_fails_before_parsing(image_spec: EngineSpec, tmp_path: Path):
    fake = FakeTensorRT(fast_fp16=False)
    with pytest.raises(ValueError, match="no fast native fp16"):
        _build_one(fake, image_spec, tmp_path)
    assert fake.parsed_files == []
    assert fake.builds == 0


def test_parser_errors_become_engine_build_error(image_spec: EngineSpec, tmp_path: Path):
    fake = FakeTensorRT(parse_errors=("UNSUPPORTED_NODE: Attention", "INVALID_GRAPH: dangling edge"))
    with pytest.raises(EngineBuildError) as raised:
        _build_one(fake, image_spec, tmp_path)
    message = str(raised.value)
    assert str(image_spec.onnx_path) in message
    assert "UNSUPPORTED_NODE: Attention" in message
    assert "INVALID_GRAPH: dangling edge" in message
    assert fake.builds == 0


def test_build_returning_none_is_engine_build_error(image_spec: EngineSpec, tmp_path: Path):
    fake = FakeTensorRT(build_returns_none=True)
    with pytest.raises(EngineBuildError, match="failed to build the image engine"):
        _build_one(fake, image_spec, tmp_path)
    assert not (tmp_path / "out" / "image.plan").exists()


def test_wrong_input_name_is_engine_build_error(image_spec: EngineSpec, tmp_path: Path):
    fake = FakeTensorRT()
    spec = EngineSpec("image", image_spec.onnx_path, "pixel_values", IMAGE_SHAPE)
    with pytest.raises(EngineBuildError, match=r"no input named 'pixel_values'.*\['pixels'\]"):
        _build_one(fake, spec, tmp_path)


def test_missing_onnx_file_is_reported(tmp_path: Path):
    spec = EngineSpec("image", tmp_path / "nope.onnx", "pixels", IMAGE_SHAPE)
    with pytest.raises(FileNotFoundError, match=r"nope\.onnx"):
        _build_one(FakeTensorRT(), spec, tmp_path)


def test_shapes_must_match_the_sample_shape(image_spec: EngineSpec, tmp_path: Path):
    with pytest.raises(ValueError, match="do not match"):
        _build_one(FakeTensorRT(), image_spec, tmp_path, shapes=profile_shapes(TEXT_SHAPE, opt_batch=1, max_batch=1))


def test_timing_cache_is_read_and_written_back(specs: tuple[EngineSpec, EngineSpec], tmp_path: Path):
    cache_path = tmp_path / "cache" / "timing.cache"
    cache_path.parent.mkdir()
    cache_path.write_bytes(b"earlier-run")
    fake = FakeTensorRT()
    image, text = specs

    _build_one(fake, image, tmp_path, timing_cache_path=cache_path)
    assert fake.timing_cache_given == [b"earlier-run"]
    assert fake.timing_cache_ignore_mismatch == [False]
    after_first = cache_path.read_bytes()
    assert after_first == b"earlier-run[timed image.onnx]" == fake.timing_cache_returned[-1]

    _build_one(
        fake, text, tmp_path, timing_cache_path=cache_path, shapes=profile_shapes(TEXT_SHAPE, opt_batch=8, max_batch=32)
    )
    assert fake.timing_cache_given == [b"earlier-run", after_first]
    assert cache_path.read_bytes() == after_first + b"[timed text.onnx]"


def test_timing_cache_starts_empty_when_absent(image_spec: EngineSpec, tmp_path: Path):
    cache_path = tmp_path / "new" / "timing.cache"
    fake = FakeTensorRT()
    _build_one(fake, image_spec, tmp_path, timing_cache_path=cache_path)
    assert fake.timing_cache_given == [b""]
    assert cache_path.read_bytes() == b"[timed image.onnx]"


def test_timing_cache_from_another_gpu_is_replaced(image_spec: EngineSpec, tmp_path: Path):
    cache_path = tmp_path / "timing.cache"
    cache_path.write_bytes(b"other-gpu timings")
    fake = FakeTensorRT()
    _build_one(fake, image_spec, tmp_path, timing_cache_path=cache_path)
    assert fake.timing_cache_given == [b"other-gpu timings", b""]
    assert fake.timing_cache_ignore_mismatch == [False, False]
    assert cache_path.read_bytes() == b"[timed image.onnx]"


# --- build_engines -------------------------------------------------------------------------------------------------


def test_build_engines_writes_plans_per_gpu_and_tensorrt_version(specs: tuple[EngineSpec, EngineSpec], tmp_path: Path):
    fake = FakeTensorRT(version="10.7.0")
    model_dir = tmp_path / "model"
    result = build_engines(
        specs,
        model_dir,
        precision="fp16",
        opt_batch=8,
        max_batch=32,
        timing_cache_path=tmp_path / "timing.cache",
        trt=fake,
        gpu=H200,
    )

    assert isinstance(result, EngineBuild)
    assert result.directory == "tensorrt/sm90-trt10.7.0"
    assert (result.gpu, result.tensorrt_version, result.precision) == (H200, "10.7.0", "fp16")
    assert (result.min_batch, result.opt_batch, result.max_batch) == (1, 8, 32)
    assert [engine.role for engine in result.engines] == ["image", "text"]

    image_plan = model_dir / "tensorrt" / "sm90-trt10.7.0" / "image.plan"
    text_plan = model_dir / "tensorrt" / "sm90-trt10.7.0" / "text.plan"
    assert result.engines[0].plan_path == image_plan.resolve()
    assert result.engines[1].plan_path == text_plan.resolve()
    assert image_plan.read_bytes() == fake.serialized[0]
    assert text_plan.read_bytes() == fake.serialized[1]
    assert image_plan.read_bytes().startswith(b"FAKE-PLAN image.onnx")
    assert text_plan.read_bytes().startswith(b"FAKE-PLAN text.onnx")

    assert fake.profile_shapes == [
        ("pixels", (1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224)),
        ("token_ids", (1, 77), (8, 77), (32, 77)),
    ]
    assert fake.flags_set == [fake.BuilderFlag.FP16, fake.BuilderFlag.FP16]
    # The second build starts from the cache the first one wrote.
    assert fake.timing_cache_given == [b"", b"[timed image.onnx]"]


def test_build_engines_validates_batches_before_touching_tensorrt(specs: tuple[EngineSpec, EngineSpec], tmp_path):
    fake = FakeTensorRT()
    with pytest.raises(ValueError, match="max_batch"):
        build_engines(specs, tmp_path, opt_batch=16, max_batch=8, trt=fake, gpu=H200)
    assert fake.builder_loggers == []
    assert not (tmp_path / "tensorrt").exists()


def test_build_engines_rejects_duplicate_roles(image_spec: EngineSpec, tmp_path: Path):
    with pytest.raises(ValueError, match="unique"):
        build_engines([image_spec, image_spec], tmp_path, opt_batch=1, max_batch=1, trt=FakeTensorRT(), gpu=H200)


def test_build_engines_bf16_refused_on_turing(specs: tuple[EngineSpec, EngineSpec], tmp_path: Path):
    fake = FakeTensorRT()
    with pytest.raises(ValueError, match="Ampere"):
        build_engines(specs, tmp_path, precision="bf16", opt_batch=1, max_batch=1, trt=fake, gpu=T4)
    assert fake.builds == 0


# --- finding the GPU --------------------------------------------------------------------------------------------


def _without_cuda_bindings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)  # importing it now raises ImportError


def test_current_gpu_without_cuda_raises_no_gpu_error(monkeypatch: pytest.MonkeyPatch):
    torch = pytest.importorskip("torch")
    _without_cuda_bindings(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(NoGpuError, match=r"torch\.cuda\.is_available\(\) is False"):
        current_gpu()


def test_current_gpu_reads_name_and_capability_from_torch_without_cuda_bindings(monkeypatch: pytest.MonkeyPatch):
    fake_cuda = types.SimpleNamespace(
        is_available=lambda: True,
        get_device_name=lambda device: "NVIDIA H200",
        get_device_capability=lambda device: (9, 0),
    )
    _without_cuda_bindings(monkeypatch)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=fake_cuda))
    assert current_gpu() == H200


def test_current_gpu_through_the_real_cuda_bindings_without_a_gpu():
    """The real cuda-bindings (a dev dependency) on this GPU-less machine: a clear NoGpuError, no torch needed."""
    pytest.importorskip("cuda.bindings.runtime")
    with pytest.raises(NoGpuError, match=r"No CUDA GPU is visible \(CUDA runtime: .+\)\. TensorRT engines are built"):
        current_gpu()


def test_current_gpu_reads_the_device_properties_from_cuda_bindings(monkeypatch: pytest.MonkeyPatch):
    """faked: no GPU here; the fake returns what cuda-bindings' cudaGetDeviceProperties does on an H200."""
    success = object()
    runtime = types.SimpleNamespace(
        cudaError_t=types.SimpleNamespace(cudaSuccess=success),
        cudaGetDeviceCount=lambda: (success, 1),
        cudaGetDeviceProperties=lambda device: (
            success,
            types.SimpleNamespace(name=b"NVIDIA H200" + b"\0" * 245, major=9, minor=0),
        ),
    )
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = runtime  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", runtime)
    monkeypatch.setitem(sys.modules, "torch", None)  # the GPU image has no torch
    assert current_gpu() == H200
