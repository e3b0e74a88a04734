import pytest

from models.label_sets import UnknownLabelSet, builtin_label_set
from models.templates import PRESETS


def test_imagenet_1k_is_the_papers_thousand_classes_with_the_80_templates():
    labels, preset = builtin_label_set("imagenet-1k")
    assert len(labels) == 1000 and labels[:2] == ("tench", "goldfish") and len(PRESETS[preset]) == 80
    metadata = pytest.importorskip("open_clip.zero_shot_metadata")
    assert list(labels) == list(metadata.IMAGENET_CLASSNAMES)


def test_an_unknown_built_in_is_refused():
    with pytest.raises(UnknownLabelSet, match="imagenet-1k"):
        builtin_label_set("imagenet-22k")
