import numpy as np
import pytest

from models.fewshot import blend, example_means


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
