import numpy as np
import pytest

import models.fewshot
from models.fewshot import BLEND, blend, example_means, label_bias, prototypes


def _unit(*values: float) -> np.ndarray:
    vector = np.asarray(values, np.float32)
    return vector / np.linalg.norm(vector)


def test_blend_moves_labels_with_examples_toward_them_and_leaves_the_rest():
    text = np.stack([_unit(1, 0, 0), _unit(0, 1, 0), _unit(0, 0, 1)])
    examples = np.stack([_unit(0, 0, 1), _unit(0, 1, 1)])  # both for label 0
    blended = blend(text, examples, np.array([0, 0]), weight=1.0)
    mean = _unit(*(examples.sum(axis=0)))
    np.testing.assert_allclose(blended[0], _unit(*(text[0] + np.sqrt(2) * mean)), atol=1e-6)  # two examples
    np.testing.assert_array_equal(blended[1:], text[1:])
    np.testing.assert_allclose(np.linalg.norm(blended, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(blend(text, examples, np.array([0, 0]), weight=0.0), text)
    np.testing.assert_array_equal(blend(text, np.zeros((0, 3)), np.zeros(0, int)), text)
    with pytest.raises(ValueError):
        blend(text, examples, np.array([0, 0]), weight=-1)


def test_example_means_count_per_label():
    means, counts = example_means(np.stack([_unit(1, 0), _unit(1, 0), _unit(0, 1)]), np.array([2, 2, 0]), 3)
    assert counts.tolist() == [1, 0, 2]
    np.testing.assert_allclose(means, [[0, 1], [0, 0], [1, 0]], atol=1e-6)


def test_label_bias_makes_the_examples_pick_their_own_labels():
    """Zero-shot prefers label 1 for label 0's images; the fitted bias moves the boundary so that the examples
    (and images like them) go to label 0, keeps labels without examples at 0 and is centred over the others."""
    text = np.stack([_unit(1, 0.0), _unit(1, 0.4), _unit(0, 1)])  # label 2 gets no examples
    examples = np.stack([_unit(1, 0.25), _unit(1, 0.3), _unit(1, 0.6), _unit(1, 0.7)])
    labels = np.array([0, 0, 1, 1])
    scale = 50.0
    zero_shot = (scale * examples @ text.T).argmax(axis=1)
    assert zero_shot.tolist() == [1, 1, 1, 1]  # the first two are wrong zero-shot
    bias = label_bias(text, examples, labels, scale)
    assert bias[2] == 0 and abs(bias[0] + bias[1]) < 1e-5 and bias[0] > 0
    assert (scale * examples @ text.T + bias).argmax(axis=1).tolist() == [0, 0, 1, 1]
    assert np.all(label_bias(text, examples, np.zeros(4, int), scale) == 0)  # one label: nothing to arbitrate


def test_label_bias_over_the_strongest_rivals_matches_the_full_fit(monkeypatch: pytest.MonkeyPatch):
    rng = np.random.default_rng(0)
    text = rng.standard_normal((200, 16)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    labels = np.repeat(np.arange(200), 2)
    examples = text[labels] + 0.6 * rng.standard_normal((400, 16)).astype(np.float32)
    examples /= np.linalg.norm(examples, axis=1, keepdims=True)
    rivals = label_bias(text, examples, labels, 20.0, chunk=128)  # 64 rivals of 200 labels, in chunks
    monkeypatch.setattr(models.fewshot, "COMPETITORS", 1000)
    full = label_bias(text, examples, labels, 20.0)
    np.testing.assert_allclose(rivals, full, atol=0.05)
    assert np.abs(full).max() > 0.5  # a fit that did something


def test_prototypes_scale_with_the_weight_and_reuse_a_fit():
    text = np.stack([_unit(1, 0.0), _unit(1, 0.4), _unit(0, 1)])
    examples, labels = np.stack([_unit(1, 0.25), _unit(1, 0.7)]), np.array([0, 1])
    assert prototypes(text, examples, labels, 50.0, weight=0).bias is None
    assert prototypes(text, examples, labels, 50.0, weight=0).matrix is not None
    one = prototypes(text, examples, labels, 50.0)
    two = prototypes(text, examples, labels, 50.0, weight=2.0, bias=one.bias)
    assert one.bias is not None and two.bias is not None
    np.testing.assert_allclose(two.bias, 2 * one.bias, rtol=1e-6)
    np.testing.assert_allclose(one.matrix, blend(text, examples, labels, BLEND), atol=1e-7)
    np.testing.assert_allclose(two.matrix, blend(text, examples, labels, 2 * BLEND), atol=1e-7)
