"""The PyTorch engine: precisions, CUDA-graph buckets and device-resident outputs, on real towers.

CPU tests run real torch on the demo model and on a small random-init ViT. The bucket tests on the CPU replace
only the CUDA graph capture (the GPU boundary) with `ReplayEagerly`, which has a graph's contract: fixed
buffers, and every replay overwrites the same output. Tests marked `gpu` run the real CUDA graphs.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")

from models import zoo  # noqa: E402
from models.demo.config import EXPORT_NAME, REPOSITORY_DIR  # noqa: E402
from models.manifest import load_manifest  # noqa: E402
from service.engines.base import EngineError  # noqa: E402
from service.engines.torch import (  # noqa: E402
    StaticForward,
    TorchEngine,
    _torch_copy_to_host,
    batch_buckets,
    bucket_for,
    load_torch_engines,
)
from service.gpu.device_array import DeviceArray  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.gpu import requires_gpu  # noqa: E402

# bf16 keeps 8 bits of mantissa. Measured on the CPU (torch 2.14, 32 rows), least cosine to fp32: demo image tower
# 0.99982, demo text tower 0.99997, the tiny ViT 0.99995; the bound leaves room for other CPUs' bf16 kernels.
BF16_CPU_MIN_COSINE = 0.999
HALF_GPU_MIN_COSINE = 0.99  # the issue's bound for fp16/bf16 against fp32 on the GPU
ODD_BATCHES = [1, 3, 5, 7]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def demo_towers() -> zoo.LoadedModel:
    return zoo.load_demo()  # a fresh copy each time: engines cast their tower in place


def tiny_vit_tower() -> torch.nn.Module:
    """A random-init open_clip ViT image tower, small enough for the CPU (the GPU benchmark uses ViT-B-32)."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        text_cfg={"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    )
    return zoo.ImageTower(model.eval().requires_grad_(False), "encode_image").eval()


def pixels(rows: int, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 3, size, size), dtype=np.float32)


def token_ids(rows: int, context: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = np.zeros((rows, context), dtype=np.int64)
    ids[:, 0] = 49406
    for row in range(rows):
        length = int(rng.integers(1, context - 2))
        ids[row, 1 : length + 1] = rng.integers(1, 49405, length)
        ids[row, length + 1] = 49407
    return ids


def reference(tower: torch.nn.Module, inputs: np.ndarray) -> np.ndarray:
    """What the engine did before precisions and graphs: the tower called eagerly on the tensor."""
    with torch.inference_mode():
        return tower(torch.from_numpy(inputs)).numpy()


class ReplayEagerly:
    """Fake of the CUDA graph capture (no GPU here): the same static buffers, each replay reruns the tower eagerly."""

    def __init__(self) -> None:
        self.captured: list[int] = []

    def __call__(self, tower: torch.nn.Module, inputs: torch.Tensor) -> StaticForward:
        self.captured.append(len(inputs))
        outputs = tower(inputs).clone()

        def replay() -> None:
            outputs.copy_(tower(inputs))

        return StaticForward(inputs, outputs, replay)


# ------------------------------------------------------------------------------------------------- buckets


@pytest.mark.parametrize(
    "max_batch,expected",
    [
        (1, (1,)),
        (2, (1, 2)),
        (32, (1, 2, 4, 8, 16, 32)),
        (100, (1, 2, 4, 8, 16, 32, 64, 100)),
        (256, (1, 2, 4, 8, 16, 32, 64, 128, 256)),
    ],
)
def test_buckets_are_powers_of_two_up_to_the_max_batch_size(max_batch, expected):
    assert batch_buckets(max_batch) == expected


@pytest.mark.parametrize("rows,expected", [(1, 1), (2, 2), (3, 4), (5, 8), (63, 64), (64, 64), (65, 100), (100, 100)])
def test_a_batch_goes_to_the_smallest_bucket_that_holds_it(rows, expected):
    assert bucket_for(rows, batch_buckets(100)) == expected


def test_a_batch_beyond_the_largest_bucket_has_none_and_an_empty_one_is_an_error():
    assert bucket_for(101, batch_buckets(100)) is None
    with pytest.raises(ValueError):
        bucket_for(0, batch_buckets(100))
    with pytest.raises(ValueError):
        batch_buckets(0)


# ------------------------------------------------------------------------------------------- CPU precision


@pytest.mark.parametrize("rows", ODD_BATCHES)
def test_fp32_on_the_cpu_equals_the_tower_called_directly(rows):
    model = demo_towers()
    image = TorchEngine(model.image_tower, "image", device="cpu", name=model.name)
    text = TorchEngine(model.text_tower, "text", device="cpu", name=model.name)
    for engine, inputs in ((image, pixels(rows)), (text, token_ids(rows))):
        out = engine(inputs)
        assert out.dtype == np.float32 and out.shape == (rows, 64) and out.flags.c_contiguous
        np.testing.assert_array_equal(out, reference(getattr(model, f"{engine.role}_tower"), inputs))
    assert image.precision == text.precision == "fp32"
    assert image.description.startswith("torch ") and " cpu fp32 eager clipserve-demo image" in image.description
    assert not image.cuda_graphs and not image.device_resident  # CUDA graphs asked for, but there is no GPU


def test_bf16_on_the_cpu_stays_within_its_documented_cosine_of_fp32():
    fp32_model, bf16_model = demo_towers(), demo_towers()
    for role, inputs in (("image", pixels(5)), ("text", token_ids(5))):
        fp32 = TorchEngine(getattr(fp32_model, f"{role}_tower"), role, device="cpu")(inputs)
        engine = TorchEngine(getattr(bf16_model, f"{role}_tower"), role, device="cpu", precision="bf16")
        bf16 = engine(inputs)
        assert engine.precision == "bf16" and " bf16 " in engine.description
        assert bf16.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(bf16, axis=1), 1.0, atol=1e-5)  # normalised in fp32
        assert cosines(fp32, bf16).min() >= BF16_CPU_MIN_COSINE
        tower = getattr(bf16_model, f"{role}_tower")
        assert next(tower.parameters()).dtype == torch.bfloat16  # weights converted once, not autocast


def test_bf16_on_a_random_init_vit_on_the_cpu():
    inputs = pixels(7, size=32)
    fp32 = TorchEngine(tiny_vit_tower(), "image", device="cpu")(inputs)
    bf16 = TorchEngine(tiny_vit_tower(), "image", device="cpu", precision="bf16")(inputs)
    assert cosines(fp32, bf16).min() >= BF16_CPU_MIN_COSINE


def test_fp16_on_the_cpu_is_refused_with_a_reason():
    with pytest.raises(EngineError, match=r"fp16 on the CPU.*CLIPSERVE_PRECISION=fp32"):
        TorchEngine(tiny_vit_tower(), "image", device="cpu", precision="fp16")


def test_an_unknown_precision_or_role_is_refused():
    with pytest.raises(EngineError, match="fp32, fp16, bf16, not 'int8'"):
        TorchEngine(tiny_vit_tower(), "image", device="cpu", precision="int8")
    with pytest.raises(EngineError, match="unknown encoder role"):
        TorchEngine(tiny_vit_tower(), "audio", device="cpu")


def test_a_closed_engine_refuses_every_call():
    engine = TorchEngine(tiny_vit_tower(), "image", device="cpu", graph_capture=ReplayEagerly())
    engine(pixels(2, size=32))
    engine.close()
    engine.close()  # twice is harmless
    with pytest.raises(EngineError, match="closed"):
        engine(pixels(2, size=32))
    with pytest.raises(EngineError, match="embeddings are host arrays"):
        engine.embed_on_device(pixels(2, size=32))


def test_tensor_inputs_equal_numpy_inputs_and_wrong_kinds_are_refused():
    model = demo_towers()
    image = TorchEngine(model.image_tower, "image", device="cpu")
    text = TorchEngine(model.text_tower, "text", device="cpu")
    np.testing.assert_array_equal(image(torch.from_numpy(pixels(3))), image(pixels(3)))
    np.testing.assert_array_equal(text(torch.from_numpy(token_ids(3)).int()), text(token_ids(3)))
    with pytest.raises(EngineError, match="floating-point pixels"):
        image(torch.zeros((1, 3, 64, 64), dtype=torch.uint8))
    with pytest.raises(EngineError, match="integer token ids"):
        text(torch.zeros((1, 32)))


# ---------------------------------------------------------------------------- buckets through the engine


def test_bucketed_replays_equal_eager_for_every_batch_size_and_capture_once_per_bucket():
    capture = ReplayEagerly()
    graphs = TorchEngine(tiny_vit_tower(), "image", device="cpu", max_batch_size=8, graph_capture=capture)
    eager = TorchEngine(tiny_vit_tower(), "image", device="cpu", cuda_graphs=False, max_batch_size=8)
    assert graphs.cuda_graphs and " cuda-graphs " in graphs.description and not eager.cuda_graphs
    for rows in (8, 3, 1, 5, 2, 7, 4, 6, 3):  # big first: smaller batches leave stale rows in the padding
        inputs = pixels(rows, size=32, seed=rows)
        np.testing.assert_allclose(graphs(inputs), eager(inputs), rtol=0, atol=1e-6)
    assert capture.captured == [8, 4, 1, 2]  # lazily, on first use of each bucket


def test_a_batch_beyond_the_largest_bucket_runs_eagerly():
    capture = ReplayEagerly()
    tower = tiny_vit_tower()
    engine = TorchEngine(tower, "image", device="cpu", max_batch_size=4, graph_capture=capture)
    inputs = pixels(6, size=32)
    np.testing.assert_allclose(engine(inputs), reference(tower, inputs), rtol=0, atol=1e-6)
    assert capture.captured == [] and engine.max_batch_size == 4


def test_results_are_not_views_of_the_static_output_buffer():
    engine = TorchEngine(tiny_vit_tower(), "image", device="cpu", max_batch_size=4, graph_capture=ReplayEagerly())
    first = engine(pixels(3, size=32, seed=1))
    kept = first.copy()
    engine(pixels(3, size=32, seed=2))  # same bucket: the replay overwrites the static output
    np.testing.assert_array_equal(first, kept)


def test_a_failed_capture_falls_back_to_eager_and_is_logged_once(caplog):
    calls = []

    def failing_capture(tower, inputs):
        calls.append(len(inputs))
        raise RuntimeError("operation not permitted when stream is capturing")

    tower = tiny_vit_tower()
    engine = TorchEngine(tower, "image", device="cpu", max_batch_size=8, graph_capture=failing_capture)
    with caplog.at_level(logging.WARNING, logger="clipserve.engines"):
        for rows in (1, 3, 8):
            inputs = pixels(rows, size=32)
            np.testing.assert_allclose(engine(inputs), reference(tower, inputs), rtol=0, atol=1e-6)
    assert calls == [1] and not engine.cuda_graphs
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "run eagerly from now on: operation not permitted" in warnings[0]


def test_graphs_captured_before_a_failed_capture_keep_replaying():
    class FailsFromTheSecondCapture(ReplayEagerly):
        def __call__(self, tower, inputs):
            if self.captured:
                raise RuntimeError("out of memory")
            return super().__call__(tower, inputs)

    capture, tower = FailsFromTheSecondCapture(), tiny_vit_tower()
    engine = TorchEngine(tower, "image", device="cpu", max_batch_size=8, graph_capture=capture)
    for rows in (2, 7, 2, 8, 1):
        inputs = pixels(rows, size=32, seed=rows)
        np.testing.assert_allclose(engine(inputs), reference(tower, inputs), rtol=0, atol=1e-6)
    assert capture.captured == [2] and not engine.cuda_graphs


@pytest.mark.parametrize(
    "dtype,name", [(torch.float32, "float32"), (torch.bfloat16, "bfloat16"), (torch.float16, "float16")]
)
def test_the_torch_copy_reads_rows_of_its_owner(dtype, name):
    """The copy embed_on_device attaches, run on a CPU tensor: the address arithmetic is the same as on a GPU."""
    owner = torch.linspace(-1, 1, 5 * 6).reshape(5, 6).to(dtype)
    array = DeviceArray(owner.data_ptr(), (5, 6), name, owner, copy_to_host=_torch_copy_to_host(owner))
    np.testing.assert_array_equal(array.rows(1, 4).to_host(), owner[1:4].float().numpy())
    np.testing.assert_array_equal(array[3:].to_host(), owner[3:].float().numpy())
    outside = DeviceArray(owner.data_ptr() + owner.nbytes, (1, 6), name, owner, copy_to_host=array.copy_to_host)
    with pytest.raises(ValueError, match="outside"):
        outside.to_host()


# ----------------------------------------------------------------------------------------------- factory


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(REPOSITORY_DIR / EXPORT_NAME)


def test_load_torch_engines_reads_precision_and_batch_limits_from_settings(manifest):
    settings = Settings(engine="torch", max_batch_size=16, text_max_batch_size=64)
    image, text = load_torch_engines(manifest, settings.model_copy(update={"precision": "bf16"}))
    assert (image.precision, text.precision) == ("bf16", "bf16")
    assert (image.max_batch_size, text.max_batch_size) == (16, 64)
    np.testing.assert_allclose(np.linalg.norm(image(pixels(2)), axis=1), 1.0, atol=1e-5)
    with pytest.raises(EngineError, match="fp16 on the CPU"):
        load_torch_engines(manifest, Settings(engine="torch", precision="fp16"))


def test_int8_selects_exported_graphs_and_leaves_the_torch_engine_at_fp32(manifest, caplog):
    with caplog.at_level(logging.WARNING, logger="clipserve.engines"):
        image, text = load_torch_engines(manifest, Settings(engine="torch", precision="int8"))
    assert (image.precision, text.precision) == ("fp32", "fp32")
    assert "the torch engine runs fp32" in caplog.text


def test_cuda_graphs_can_be_switched_off_by_setting(manifest):
    settings = Settings(engine="torch").model_copy(update={"torch_cuda_graphs": False})
    image, _ = load_torch_engines(manifest, settings)
    assert not image.cuda_graphs and " eager " in image.description


# --------------------------------------------------------------------------------------------------- GPU


def gpu_engines(precision: str, **options) -> tuple[TorchEngine, TorchEngine]:
    """(graphs, eager) image engines on the same random-init ViT weights, cast to `precision`."""
    tower = tiny_vit_tower()
    engine = TorchEngine(tower, "image", device="cuda", precision=precision, max_batch_size=32, **options)
    eager = TorchEngine(tower, "image", device="cuda", precision=precision, cuda_graphs=False)
    return engine, eager


class TestOnTheGpu:
    """Real CUDA graphs, precisions and device-resident outputs; skipped without a GPU (make gpu-check runs them)."""

    pytestmark = requires_gpu

    @pytest.mark.parametrize("precision,min_cosine", [("fp32", 1 - 1e-5), ("fp16", 1 - 1e-3), ("bf16", 1 - 1e-3)])
    @pytest.mark.parametrize("rows", [1, 2, 3, 8, 13, 32, 40])
    def test_graph_replay_equals_eager_on_the_gpu(self, precision, min_cosine, rows):
        """Padded replays may pick other GEMM tilings than an eager call of `rows`: equal up to rounding."""
        engine, eager = gpu_engines(precision)
        for seed in range(2):  # the second call replays the captured graph with other data
            inputs = pixels(rows, size=32, seed=seed)
            assert cosines(engine(inputs), eager(inputs)).min() >= min_cosine
        assert engine.cuda_graphs and engine.device_resident  # no capture failed (a failure switches graphs off)

    @pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
    def test_embed_on_device_rows_equal_call_rows_on_the_gpu(self, precision):
        engine, _ = gpu_engines(precision)
        inputs = pixels(5, size=32)
        on_device = engine.embed_on_device(inputs)
        assert on_device.shape == (5, 32) and on_device.dtype == "float32" and on_device.device == 0
        host = on_device.to_host()
        np.testing.assert_array_equal(host, on_device.owner.cpu().numpy())
        np.testing.assert_allclose(host, engine(inputs), rtol=0, atol=1e-6)  # the same graph replayed again
        np.testing.assert_array_equal(on_device.rows(1, 4).to_host(), host[1:4])
        # The CUDA driver's copy (what engines without their own copy use) reads the same memory.
        np.testing.assert_array_equal(replace(on_device, copy_to_host=None).rows(1, 4).to_host(), host[1:4])

    def test_a_device_array_survives_the_next_batch_on_the_gpu(self):
        engine, _ = gpu_engines("fp16")
        first = engine.embed_on_device(pixels(3, size=32, seed=1))
        kept = first.owner.clone()
        expected = first.to_host()
        second = engine.embed_on_device(pixels(3, size=32, seed=2))  # the same bucket's graph replays
        assert first.pointer != second.pointer
        assert torch.equal(first.owner, kept)
        np.testing.assert_array_equal(first.to_host(), expected)

    def test_cuda_tensor_inputs_equal_host_inputs_on_the_gpu(self):
        engine, _ = gpu_engines("fp16")
        inputs = pixels(6, size=32)
        on_gpu = torch.from_numpy(inputs).cuda()
        np.testing.assert_array_equal(engine(on_gpu), engine(inputs))
        np.testing.assert_array_equal(engine.embed_on_device(on_gpu).to_host(), engine(inputs))

    @pytest.mark.parametrize("precision", ["fp16", "bf16"])
    def test_half_precisions_stay_within_the_issue_s_cosine_of_fp32_on_the_gpu(self, precision):
        inputs = pixels(9, size=32)
        fp32 = TorchEngine(tiny_vit_tower(), "image", device="cuda", max_batch_size=16)(inputs)
        half = TorchEngine(tiny_vit_tower(), "image", device="cuda", precision=precision, max_batch_size=16)
        assert cosines(fp32, half(inputs)).min() >= HALF_GPU_MIN_COSINE
        model = demo_towers()  # the demo's ResNet tower and its text tower, both with graphs
        image = TorchEngine(model.image_tower, "image", device="cuda", precision=precision, max_batch_size=8)
        text = TorchEngine(model.text_tower, "text", device="cuda", precision=precision, max_batch_size=8)
        cpu = demo_towers()
        for engine, cpu_tower, batch in ((image, cpu.image_tower, pixels(5)), (text, cpu.text_tower, token_ids(5))):
            assert cosines(reference(cpu_tower, batch), engine(batch)).min() >= HALF_GPU_MIN_COSINE
            assert engine.cuda_graphs
