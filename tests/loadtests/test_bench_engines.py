"""The raw-engine part of `make bench`, on the demo model with tiny timing windows: every runtime and precision that
can run here gives images/s at each batch size, the others say why not; the machine description and its ceiling."""

from __future__ import annotations

import json

import pytest

from loadtests.bench import engines, machine
from models.demo.config import EXPORT_NAME, REPOSITORY_DIR

DEMO_DIR = REPOSITORY_DIR / EXPORT_NAME
BATCHES = (1, 2)


@pytest.fixture(scope="module")
def results() -> list[engines.EngineResult]:
    pytest.importorskip("openvino")
    pytest.importorskip("torch")
    pytest.importorskip("open_clip")
    return engines.run(DEMO_DIR, BATCHES, seconds=0.01, reps=1, log=lambda line: None)


def by_key(results: list[engines.EngineResult]) -> dict[tuple[str, str, int], engines.EngineResult]:
    return {(r.runtime, r.precision, r.batch): r for r in results}


@pytest.mark.parametrize(
    ("runtime", "precision"),
    [("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("openvino", "fp32"), ("torch", "fp32")],
)
def test_every_engine_is_timed_at_every_batch(results, runtime, precision):
    found = by_key(results)
    for batch in BATCHES:
        result = found[(runtime, precision, batch)]
        assert result.model == EXPORT_NAME
        assert result.images_per_s is not None and result.images_per_s > 0, result
        assert result.ms_per_call is not None and result.ms_per_call > 0
        assert result.engine


def test_the_others_run_or_say_why_not(results):
    found = by_key(results)
    # The demo exports no fp16 graph: one row, at the smallest batch, with the reason.
    fp16 = [r for r in results if (r.runtime, r.precision) == ("onnxruntime", "fp16")]
    assert [(r.batch, r.images_per_s) for r in fp16] == [(1, None)]
    assert fp16[0].note.startswith("skipped: no fp16 ONNX image graph")
    bf16 = [r for r in results if (r.runtime, r.precision) == ("openvino", "bf16")]
    if bf16[0].images_per_s is None:
        assert len(bf16) == 1 and "bf16" in bf16[0].note and bf16[0].note.startswith("skipped: ")
    else:
        assert all(found[("openvino", "bf16", b)].images_per_s for b in BATCHES)
        assert 0.99 < (bf16[0].min_cosine_vs_fp32 or 0) <= 1.0 + 1e-6


def test_same_weights_agree_with_onnxruntime_fp32(results):
    found = by_key(results)
    assert found[("onnxruntime", "fp32", 1)].min_cosine_vs_fp32 is None  # it is the reference
    for key, least in (
        (("openvino", "fp32", 1), 0.9999),
        (("torch", "fp32", 1), 0.9999),
        (("onnxruntime", "int8", 1), 0.9),
    ):
        cosine = found[key].min_cosine_vs_fp32
        assert cosine is not None and least < cosine <= 1.0 + 1e-6, (key, cosine)


def test_results_are_json_ready_and_read_back(results):
    rows = json.loads(json.dumps([r.to_dict() for r in results]))
    assert [engines.EngineResult(**row) for row in rows] == results
    assert {row["gflop_per_image"] for row in rows} == {results[0].gflop_per_image}
    assert results[0].gflop_per_image is None or 0 < results[0].gflop_per_image < 1  # a 64 px ResNet, width 16
    assert f"| {EXPORT_NAME} | torch | fp32 | 2 |" in engines.table(results, 100.0)


def test_matmul_ceiling_and_machine_description():
    assert machine.matmul_gflops(seconds=0.05, n=256, reps=1) > 0
    described = machine.describe()
    expected = {"date_utc", "cpu_model", "cpu_flags", "logical_cores", "affinity_cores", "memory_gib", "os", "python"}
    assert expected <= described.keys()
    assert described["logical_cores"] >= 1 and described["cpu_model"]
    assert set(described["packages"]) == set(machine.PACKAGES)
    assert described["packages"]["numpy"] != "-"


def test_onnx_count_of_the_demo_graph():
    pytest.importorskip("onnx")
    gflop = machine.onnx_gflop_per_image(DEMO_DIR / "image.onnx")
    assert gflop is not None and 0.001 < gflop < 1


def test_unknown_runtime_is_refused():
    with pytest.raises(ValueError, match="unknown runtime"):
        engines.run(DEMO_DIR, runtimes=["tensorflow"])
