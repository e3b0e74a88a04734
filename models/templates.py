"""Prompt templates: how a label becomes text.

The paper (§3.1.4) found that wrapping a label in a sentence ("a photo of a {}.") and averaging the text
embeddings of many such sentences beats the bare label; its ImageNet ensemble has 80 templates. A preset
is a name for a tuple of format strings, each with exactly one `{}` where the label goes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MAX_TEMPLATES = 256
MAX_TEMPLATE_LENGTH = 300

# The paper's 80 ImageNet templates (CLIP's prompt-engineering notebook), in its order.
IMAGENET_80: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

SIMPLE_7: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

PRESETS: dict[str, tuple[str, ...]] = {
    "imagenet": IMAGENET_80,
    "simple": SIMPLE_7,
    "photo": ("a photo of a {}.",),
    "bare": ("{}",),
}
# Two defaults on purpose. Evaluating a model (resolve_templates(None), the demo report) uses the paper's
# 80-template ensemble, the most accurate. Serving (Settings.default_templates) uses SIMPLE_7: a label set the
# cache has not seen costs one text-encoder row per template, and these 7 are the subset CLIP's
# prompt-engineering notebook found to keep most of the 80's accuracy.
EVALUATION_PRESET = "imagenet"
SERVING_PRESET = "simple"


class TemplateError(ValueError):
    """A template list the service cannot use; the message says which entry and why."""


def validate_templates(templates: Sequence[str]) -> tuple[str, ...]:
    if isinstance(templates, str):
        raise TemplateError("templates must be a list of strings, or a preset name")
    if not templates:
        raise TemplateError("templates must not be empty")
    if len(templates) > MAX_TEMPLATES:
        raise TemplateError(f"at most {MAX_TEMPLATES} templates, got {len(templates)}")
    for i, template in enumerate(templates):
        if not isinstance(template, str):
            raise TemplateError(f"template {i} is not a string")
        if len(template) > MAX_TEMPLATE_LENGTH:
            raise TemplateError(f"template {i} is longer than {MAX_TEMPLATE_LENGTH} characters")
        # "{{" and "}}" are literal braces in str.format; only a bare "{}" is the label's slot.
        slots = template.replace("{{", "").replace("}}", "").count("{}")
        if slots != 1:
            raise TemplateError(f"template {i} ({template!r}) must contain exactly one '{{}}', found {slots}")
        try:
            template.format("label")
        except Exception as error:  # "{[{}]}" raises TypeError, "{0.x}" AttributeError: all mean "not usable"
            raise TemplateError(f"template {i} ({template!r}) is not a valid format string: {error}") from None
    return tuple(templates)


def resolve_templates(templates: str | Sequence[str] | None) -> tuple[str, ...]:
    """A preset name, a custom list, or None (the evaluation preset) -> validated templates."""
    if templates is None:
        return PRESETS[EVALUATION_PRESET]
    if isinstance(templates, str):
        if templates not in PRESETS:
            raise TemplateError(f"unknown template preset {templates!r}; presets: {', '.join(PRESETS)}")
        return PRESETS[templates]
    return validate_templates(templates)


def apply_templates(templates: Sequence[str], label: str) -> list[str]:
    return [template.format(label) for template in templates]


def ensemble(embeddings: np.ndarray, labels: int) -> np.ndarray:
    """[labels * T, D] prompt embeddings, label-major (each label's T templates together, as `apply_templates`
    lists them) -> [labels, D]: per label the L2-renormalised mean of its template embeddings (the paper's
    prompt ensemble). The one recipe for a label vector: the label cache, the demo evaluation and the export
    parity gate all use it."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    means = embeddings.reshape(labels, -1, embeddings.shape[-1]).mean(axis=1)
    return normalised(means)


def normalised(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 length (a zero row stays zero)."""
    return rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)
