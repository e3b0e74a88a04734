"""The similarity kernel's row logic (softmax, radix top-k, ties), compiled for the host, against numpy.

The code under test is service/kernels/similarity.cuh, run by a block of host threads (host_block.cu) exactly as
a CUDA block runs it; the reference is the CPU path, models/scoring.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from models.scoring import Scoring, ranked
from tests.service.kernels.host_kernels import HostRowKernel

SOFTMAX, SIGMOID = 0, 1


def reference(cosines: np.ndarray, k: int, scale: float = 100.0, bias: float | None = None, sigmoid: bool = False):  # type: ignore[no-untyped-def]
    scoring = Scoring(scale, bias, "sigmoid" if sigmoid else "softmax")
    probabilities = scoring.probabilities(cosines)
    order = ranked(probabilities, k)
    return order, np.take_along_axis(probabilities, order, 1), probabilities


def check(
    host_kernel: HostRowKernel,
    cosines: np.ndarray,
    k: int,
    *,
    threads: int = 512,
    scale: float = 100.0,
    bias: float | None = None,
    sigmoid: bool = False,
) -> None:
    order, top_p, full = reference(cosines, k, scale, bias, sigmoid)
    top_c, got_p, got_i, got_full = host_kernel.softmax_topk(
        cosines,
        k,
        scale=scale,
        bias=bias or 0.0,
        activation=SIGMOID if sigmoid else SOFTMAX,
        threads=threads,
        full_row=True,
    )
    np.testing.assert_array_equal(got_i, order)
    np.testing.assert_allclose(got_p, top_p, rtol=0, atol=1e-5)  # the fp32 bound
    np.testing.assert_array_equal(top_c, np.take_along_axis(cosines.astype(np.float32), order, 1))
    np.testing.assert_allclose(got_full, full, rtol=0, atol=1e-5)


def unit_rows(rng: np.random.Generator, rows: int, count: int) -> np.ndarray:
    """Cosines as a CLIP model gives them: small, close together (a softmax with a real spread)."""
    return rng.normal(0.2, 0.05, (rows, count)).astype(np.float32)


@pytest.mark.parametrize("threads", [1, 32, 512])
@pytest.mark.parametrize(
    ("count", "k"), [(1, 1), (2, 1), (7, 7), (255, 5), (256, 100), (257, 100), (1000, 10), (2047, 3), (2049, 128)]
)
def test_top_k_and_probabilities_match_numpy(host_kernel: HostRowKernel, threads: int, count: int, k: int) -> None:
    # count = 1 and k = count; counts around the block size and around four per thread (the 16-byte loads and
    # their tails); one thread (no reduction at all).
    rng = np.random.default_rng(count * 1000 + k)
    check(host_kernel, unit_rows(rng, 3, count), k, threads=threads)


def test_imagenet_21k_sized_label_set(host_kernel: HostRowKernel) -> None:
    rng = np.random.default_rng(0)
    check(host_kernel, unit_rows(rng, 2, 21_843), 100)


def test_k_equal_to_the_largest_kernel_top_k(host_kernel: HostRowKernel) -> None:
    rng = np.random.default_rng(1)
    check(host_kernel, unit_rows(rng, 2, 128), 128)


def test_ties_are_broken_by_label_order(host_kernel: HostRowKernel) -> None:
    cosines = np.zeros((4, 300), np.float32)
    cosines[0, [5, 100, 299]] = 0.5  # three winners, then 297 tied zeros: the lowest indices fill the rest
    cosines[1, :] = 0.25  # every label tied: 0, 1, 2, ...
    cosines[2, ::2] = 0.3  # 150 tied at the top, more than k: the ordered scan takes the first ones
    cosines[3, 250:] = 0.1  # ties only in the last tile
    for threads in (32, 256):
        check(host_kernel, cosines, 10, threads=threads)
        check(host_kernel, cosines, 100, threads=threads)


def test_negative_and_positive_zero_tie(host_kernel: HostRowKernel) -> None:
    cosines = np.array([[-0.0, 0.0, -0.0, -0.5, 0.0]], np.float32)
    check(host_kernel, cosines, 5, threads=4)


@pytest.mark.parametrize("scale", [1.0, 100.0, 1e4, 1e30])
def test_very_large_logits_stay_finite(host_kernel: HostRowKernel, scale: float) -> None:
    # Without the max subtraction exp(1e30 * 0.9) is inf; with it the winner takes probability 1.
    rng = np.random.default_rng(2)
    cosines = rng.uniform(-1, 1, (2, 513)).astype(np.float32)
    _, probabilities, _, full = host_kernel.softmax_topk(cosines, 5, scale=scale, full_row=True)
    assert np.isfinite(full).all() and np.isfinite(probabilities).all()
    order, expected, expected_full = reference(cosines, 5, scale)
    np.testing.assert_allclose(probabilities, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(full, expected_full, rtol=0, atol=1e-5)
    # Past the winner numpy's probabilities underflow to exact ties (0.0) at huge scales, which it breaks by
    # label order; the kernel still orders them by cosine. Only ties may differ, so compare with the cosine order.
    _, _, indices, _ = host_kernel.softmax_topk(cosines, 5, scale=scale)
    np.testing.assert_array_equal(indices, np.argsort(-cosines, axis=1, kind="stable")[:, :5])
    assert (indices[:, 0] == order[:, 0]).all()


def test_sigmoid_with_bias(host_kernel: HostRowKernel) -> None:
    # SigLIP-style: independent probabilities, scale ~ 117, bias ~ -12.7.
    rng = np.random.default_rng(3)
    check(host_kernel, rng.uniform(-0.2, 0.3, (3, 1000)).astype(np.float32), 20, scale=117.3, bias=-12.7, sigmoid=True)


def test_softmax_bias_cancels(host_kernel: HostRowKernel) -> None:
    rng = np.random.default_rng(4)
    check(host_kernel, unit_rows(rng, 2, 100), 10, bias=-5.0)


def test_order_key_sorts_like_floats(host_kernel: HostRowKernel) -> None:
    values = np.array(
        [-np.inf, -3e38, -1.0, -1e-38, -1e-45, -0.0, 0.0, 1e-45, 1e-38, 0.5, 1.0, 3e38, np.inf], np.float32
    )
    keys = [host_kernel.order_key(float(v)) for v in values]
    assert keys[5] == keys[6]  # -0 == +0
    distinct = keys[:5] + keys[6:]
    assert distinct == sorted(distinct) and len(set(distinct)) == len(distinct)
    assert host_kernel.order_key(float("nan")) == 0  # never ranks above a number


def test_running_softmax_state(host_kernel: HostRowKernel) -> None:
    logits = np.array([3.0, -1.0, 80.0, 79.5, -200.0], np.float32)
    top, total = host_kernel.softmax_push(logits)
    assert top == 80.0
    assert total == pytest.approx(np.exp(logits.astype(np.float64) - 80.0).sum(), rel=1e-6)
    # Merging split halves gives the same state, in either order; an empty state is the identity.
    left, right = host_kernel.softmax_push(logits[:2]), host_kernel.softmax_push(logits[2:])
    for merged in (host_kernel.softmax_merge(left, right), host_kernel.softmax_merge(right, left)):
        assert merged[0] == top and merged[1] == pytest.approx(total, rel=1e-6)
    empty = host_kernel.softmax_push(np.array([], np.float32))
    assert empty[1] == 0.0
    assert host_kernel.softmax_merge(empty, left) == left
    assert host_kernel.softmax_merge(left, empty) == left
    assert host_kernel.softmax_merge(empty, empty)[1] == 0.0


@pytest.mark.parametrize(
    ("k", "expected"), [(1, (200, 0, 2)), (2, (200, 0, 2)), (3, (7, 2, 5)), (7, (7, 2, 5)), (8, (0, 7, 1))]
)
def test_radix_select_picks_the_bin_of_the_kth_largest(
    host_kernel: HostRowKernel, k: int, expected: tuple[int, int, int]
) -> None:
    histogram = np.zeros(256, np.uint32)
    histogram[[200, 7, 0]] = 2, 5, 1
    assert host_kernel.radix_select_bin(histogram, k) == expected


def test_rows_at_a_stride_and_unaligned_rows(host_kernel: HostRowKernel) -> None:
    # The workspace pads rows to a multiple of four floats; a row that starts off a 16-byte boundary (not produced
    # by the service, but allowed) takes the element-by-element path. Both must give the same answer.
    rng = np.random.default_rng(5)
    count, stride, k = 1001, 1004, 7
    rows = unit_rows(rng, 3, count)
    order, top_p, _ = reference(rows, k)
    for offset in (0, 1):  # offset 1: every row starts 4 bytes past an aligned address
        flat = np.full(3 * stride + 1, np.nan, np.float32)  # NaN padding: read by mistake, it would show
        view = flat[offset : offset + 3 * stride].reshape(3, stride)
        view[:, :count] = rows
        top_c = np.zeros((3, k), np.float32)
        got_p = np.zeros((3, k), np.float32)
        got_i = np.zeros((3, k), np.int32)
        host_kernel.softmax_topk_at(
            view.ctypes.data,
            stride,
            3,
            count,
            k,
            100.0,
            0.0,
            SOFTMAX,
            64,
            top_c.ctypes.data,
            got_p.ctypes.data,
            got_i.ctypes.data,
            0,
        )
        np.testing.assert_array_equal(got_i, order)
        np.testing.assert_allclose(got_p, top_p, rtol=0, atol=1e-5)
