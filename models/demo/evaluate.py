"""Zero-shot evaluation of the demo model on freshly rendered images, written as a Markdown report.

Four tasks, each scored with three prompt settings (bare label, "a photo of a {}.", the 80-template
ensemble): 40-way "colour shape" on compositions seen in training, the same 40 labels on held-out
compositions, 5-way shape and 8-way colour. A second table repeats the tasks on images larger than any
drawn in training (320-960 px short side) to show how far the model generalises.
The encoders are passed in as numpy functions, so the same code scores PyTorch, ONNX or the live service.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from models.demo import shapes
from models.demo.config import PREPROCESS
from models.preprocess import ImageTransform, PreprocessConfig
from models.scoring import cosines
from models.templates import EVALUATION_PRESET, PRESETS, apply_templates, ensemble

EncodeImages = Callable[[np.ndarray], np.ndarray]  # [B,3,H,W] float32 -> [B,D] normalised
EncodeTexts = Callable[[list[str]], np.ndarray]  # texts -> [B,D] normalised

PROMPT_SETTINGS: dict[str, tuple[str, ...]] = {
    "bare label": PRESETS["bare"],
    '"a photo of a {}."': PRESETS["photo"],
    "80-template ensemble": PRESETS[EVALUATION_PRESET],
}
TARGETS = {"seen": 0.95, "held_out": 0.85, "shape": 0.95, "colour": 0.98}
TRAINING_LIKE = "training-like renderings (40-320 px)"
# (min, max) short side in pixels; the second set is outside what training ever drew.
DISTRIBUTIONS = {TRAINING_LIKE: (40, 320), "larger images (320-960 px)": (320, 960)}
EVAL_SEED = 20_260_001  # distinct from every training stream


@dataclass(frozen=True)
class Task:
    key: str
    title: str
    labels: tuple[str, ...]
    compositions: tuple[tuple[str, str], ...]
    truth: Callable[[str, str], str]  # (colour, shape) -> correct label


COMPOSITION_LABELS = tuple(f"{c} {s}" for c, s in shapes.ALL_COMPOSITIONS)
TASKS = (
    Task(
        "seen",
        "40-way colour+shape, seen compositions",
        COMPOSITION_LABELS,
        shapes.SEEN_COMPOSITIONS,
        lambda c, s: f"{c} {s}",
    ),
    Task(
        "held_out",
        "40-way colour+shape, held-out compositions",
        COMPOSITION_LABELS,
        shapes.HELD_OUT_COMPOSITIONS,
        lambda c, s: f"{c} {s}",
    ),
    Task("shape", "5-way shape", shapes.SHAPES, shapes.ALL_COMPOSITIONS, lambda c, s: s),
    Task("colour", "8-way colour", tuple(shapes.COLOURS), shapes.ALL_COMPOSITIONS, lambda c, s: c),
)


def label_matrix(encode_texts: EncodeTexts, labels: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """[C, D]: per label the renormalised mean of its template embeddings (the paper's ensemble)."""
    texts = [text for label in labels for text in apply_templates(templates, label)]
    return ensemble(encode_texts(texts), len(labels))


def render_set(
    task: Task, count: int, seed: int, *, min_side: int = 40, max_side: int = 320
) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng([seed, TASKS.index(task), min_side, max_side])
    transform = ImageTransform(PreprocessConfig.from_dict(PREPROCESS))
    pixels, truth = [], []
    for _ in range(count):
        colour, shape = shapes.random_composition(rng, task.compositions)
        pixels.append(transform(shapes.render(rng, colour, shape, min_side=min_side, max_side=max_side).image))
        truth.append(task.truth(colour, shape))
    return np.stack(pixels), truth


def _embed_images(encode_images: EncodeImages, pixels: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([encode_images(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])


def evaluate(
    encode_images: EncodeImages,
    encode_texts: EncodeTexts,
    images_per_task: int = 1000,
    seed: int = EVAL_SEED,
    batch: int = 128,
    progress: Callable[[str], None] | None = None,
    distributions: Sequence[str] = tuple(DISTRIBUTIONS),
) -> dict[str, dict[str, dict[str, float]]]:
    """{distribution: {task key: {prompt setting: top-1}}}."""
    # Label vectors depend only on (labels, templates): encode each set once, not per task and distribution.
    classes = {
        (task.labels, setting): label_matrix(encode_texts, task.labels, templates)
        for task in TASKS
        for setting, templates in PROMPT_SETTINGS.items()
    }
    results: dict[str, dict[str, dict[str, float]]] = {}
    for distribution in distributions:
        min_side, max_side = DISTRIBUTIONS[distribution]
        results[distribution] = {}
        for task in TASKS:
            if progress:
                progress(f"{distribution}: {task.title}")
            pixels, truth = render_set(task, images_per_task, seed, min_side=min_side, max_side=max_side)
            image_embeddings = _embed_images(encode_images, pixels, batch)
            scores = {}
            for setting in PROMPT_SETTINGS:
                # Top-1 by cosine: the scoring's probabilities rise with it, whatever the activation.
                similarity = cosines(image_embeddings, classes[task.labels, setting])
                predicted = np.asarray(task.labels)[similarity.argmax(axis=1)]
                scores[setting] = float(np.mean(predicted == np.asarray(truth)))
            results[distribution][task.key] = scores
    return results


def markdown_report(results: dict[str, dict[str, dict[str, float]]], header: str) -> str:
    settings = list(PROMPT_SETTINGS)
    lines = [header, ""]
    for distribution, tasks in results.items():
        lines += [
            f"### {distribution}",
            "",
            "| task | target | " + " | ".join(settings) + " |",
            "|---|---|" + "---|" * len(settings),
        ]
        for task in TASKS:
            target = f"≥ {TARGETS[task.key]:.0%}" if distribution == TRAINING_LIKE else "—"
            cells = " | ".join(f"{tasks[task.key][s]:.1%}" for s in settings)
            lines.append(f"| {task.title} | {target} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def meets_targets(results: dict[str, dict[str, dict[str, float]]]) -> dict[str, bool]:
    """Per task: is the best prompt setting on training-like renderings at or above its target?"""
    main = results[TRAINING_LIKE]
    return {key: max(main[key].values()) >= target for key, target in TARGETS.items()}
