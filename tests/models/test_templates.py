import pytest

from models.templates import (
    EVALUATION_PRESET,
    IMAGENET_80,
    PRESETS,
    SERVING_PRESET,
    SIMPLE_7,
    TemplateError,
    apply_templates,
    resolve_templates,
    validate_templates,
)


def test_presets_have_the_papers_sizes():
    assert len(IMAGENET_80) == 80 and len(set(IMAGENET_80)) == 80
    assert len(SIMPLE_7) == 7
    assert PRESETS["photo"] == ("a photo of a {}.",)
    assert PRESETS["bare"] == ("{}",)
    for templates in PRESETS.values():
        assert validate_templates(templates) == templates


def test_presets_match_open_clip():
    metadata = pytest.importorskip("open_clip.zero_shot_metadata")
    assert [t("{}") for t in metadata.OPENAI_IMAGENET_TEMPLATES] == list(IMAGENET_80)
    assert [t("{}") for t in metadata.SIMPLE_IMAGENET_TEMPLATES] == list(SIMPLE_7)


def test_resolve_preset_custom_and_default():
    assert resolve_templates("simple") == SIMPLE_7
    assert resolve_templates(None) == IMAGENET_80
    assert resolve_templates(["a {} here", "{}!"]) == ("a {} here", "{}!")


def test_evaluation_uses_the_80_templates_and_serving_the_7():
    assert PRESETS[EVALUATION_PRESET] == IMAGENET_80 == resolve_templates(None)
    assert PRESETS[SERVING_PRESET] == SIMPLE_7


def test_literal_braces_are_allowed_beside_the_slot():
    assert apply_templates(["{{x}} a {}"], "cat") == ["{x} a cat"]


@pytest.mark.parametrize(
    "templates, message",
    [
        (["no slot"], "exactly one"),
        (["{} and {}"], "exactly one"),
        (["a {name} {}"], "not a valid format string"),
        (["{0}"], "exactly one"),
        ([], "must not be empty"),
        ("a {}", "list of strings"),
        ([3], "not a string"),
        (["{}" + "x" * 400], "longer than"),
        (["{}"] * 300, "at most"),
    ],
)
def test_invalid_templates_are_refused_with_a_reason(templates, message):
    with pytest.raises(TemplateError, match=message):
        validate_templates(templates)


def test_unknown_preset_names_the_presets():
    with pytest.raises(TemplateError, match="imagenet"):
        resolve_templates("nope")


def test_apply_templates_fills_the_label():
    assert apply_templates(SIMPLE_7, "red circle")[0] == "itap of a red circle."


def test_ensemble_is_the_renormalised_mean_per_label():
    import numpy as np

    from models.templates import ensemble

    # Two labels x two templates, label-major; the second label's templates cancel to a near-zero mean.
    embeddings = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-0.6, -0.79]], np.float32)
    vectors = ensemble(embeddings, 2)
    np.testing.assert_allclose(vectors[0], [2**-0.5, 2**-0.5], rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert vectors.dtype == np.float32
