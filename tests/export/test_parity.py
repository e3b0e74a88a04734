"""The export parity gate (export/parity.py) against a stand-in graph with fixed outputs."""

from __future__ import annotations

import numpy as np

from export.parity import check_graph


class _FakeGraph:
    """Test double for an ONNX Runtime session: returns fixed outputs."""

    def __init__(self, outputs: np.ndarray) -> None:
        self.outputs = outputs

    def get_inputs(self):
        return [type("Input", (), {"name": "x"})()]

    def run(self, _, feeds):
        return [self.outputs[: len(feeds["x"])]]


def test_parity_gate_fails_on_non_finite_values():
    reference = np.eye(64, 8, dtype=np.float32) + 0.1
    probe = np.zeros((64, 3), np.float32)
    assert check_graph("g.onnx", "image", "fp32", _FakeGraph(reference), probe, reference).passed
    broken = reference.copy()
    broken[5, 2] = np.nan
    assert not check_graph("g.onnx", "image", "fp32", _FakeGraph(broken), probe, reference).passed
    assert not check_graph("g.onnx", "image", "fp32", _FakeGraph(reference), probe, broken).passed
