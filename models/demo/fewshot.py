"""Few-shot examples on the demo model, measured: how much a few labelled images per label add to zero-shot.

Three tasks, with examples rendered by the demo's own generator at seeds distinct from the evaluation images:
40-way "colour shape" on held-out compositions (the zero-shot weak spot), the same on seen compositions (must not
get worse), and 10 made-up words each bound to one colour + shape (hopeless zero-shot: the model has never seen
the words). The service's method, models.fewshot.blend, is compared with two training-free alternatives on the
held-out task: Tip-Adapter's affinity cache (Zhang et al. 2022) and a Gaussian discriminant head on the examples.
`clipserve eval-fewshot` writes the table to models/demo/FEWSHOT.md.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from models.demo import shapes
from models.demo.config import PREPROCESS
from models.demo.evaluate import COMPOSITION_LABELS, EncodeImages, EncodeTexts, label_matrix
from models.fewshot import DEFAULT_WEIGHT, blend
from models.preprocess import ImageTransform, PreprocessConfig
from models.templates import EVALUATION_PRESET, PRESETS

# 32: far more than "a few", to show where this image encoder's embeddings top out whatever the method.
EXAMPLE_COUNTS = (0, 1, 2, 4, 8, 32)
MADE_UP_WORDS = ("blicket", "dax", "wug", "toma", "fep", "zorp", "kiki", "bouba", "glorp", "snib")
# One composition per word, spread over colours and shapes.
WORD_COMPOSITIONS = tuple(shapes.ALL_COMPOSITIONS[(7 * i) % len(shapes.ALL_COMPOSITIONS)] for i in range(10))
EVAL_SEED, EXAMPLE_SEED = 31_000_000, 32_000_000  # distinct from each other and from training and evaluate.py
TARGETS = {"held_out": {1: 0.95, 4: 0.97}, "seen": 0.99, "words": 0.95}


def _embed(encode_images: EncodeImages, pairs: list[tuple[str, str]], seed: int, batch: int = 128) -> np.ndarray:
    rng = np.random.default_rng(seed)
    transform = ImageTransform(PreprocessConfig.from_dict(PREPROCESS))
    pixels = np.stack([transform(shapes.render(rng, colour, shape).image) for colour, shape in pairs])
    return np.concatenate([encode_images(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])


def _accuracy(images: np.ndarray, truth: np.ndarray, logits: np.ndarray | None = None, matrix=None) -> float:  # type: ignore[no-untyped-def]
    scores = logits if logits is not None else images @ matrix.T
    return float(np.mean(scores.argmax(axis=1) == truth))


def tip_adapter(images, text, examples, labels, scale, alpha=10.0, beta=10.0) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Zero-shot logits plus alpha x (affinity to each example, exp(-beta (1 - cos))) summed per label."""
    affinity = np.exp(-beta * (1 - images @ examples.T))
    return scale * images @ text.T + alpha * affinity @ np.eye(len(text))[labels]


def gaussian_head(images, text, examples, labels, scale, alpha=1.0, shrink=0.5) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Zero-shot logits plus alpha x a linear discriminant from the examples (class means, one shrunk covariance)."""
    means = np.stack([examples[labels == c].mean(axis=0) for c in range(len(text))])
    residuals = examples - means[labels]
    covariance = residuals.T @ residuals / max(len(examples) - len(text), 1)
    dim = covariance.shape[0]
    covariance = (1 - shrink) * covariance + shrink * np.eye(dim) * np.trace(covariance) / dim
    weights = means @ np.linalg.pinv(covariance)
    return scale * images @ text.T + alpha * (images @ weights.T - 0.5 * np.sum(weights * means, axis=1))


def evaluate_fewshot(
    encode_images: EncodeImages,
    encode_texts: EncodeTexts,
    logit_scale: float,
    images_per_task: int = 1000,
    progress: Callable[[str], None] | None = None,
) -> dict[int, dict[str, float]]:
    """{examples per label: {column: top-1}}."""
    say = progress or (lambda _: None)
    templates = PRESETS[EVALUATION_PRESET]
    text = label_matrix(encode_texts, COMPOSITION_LABELS, templates)
    words_text = label_matrix(encode_texts, MADE_UP_WORDS, templates)
    rng = np.random.default_rng(EVAL_SEED)

    def task(pool: tuple[tuple[str, str], ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
        pairs = [shapes.random_composition(rng, pool) for _ in range(images_per_task)]
        truth = np.array([COMPOSITION_LABELS.index(f"{c} {s}") for c, s in pairs])
        return _embed(encode_images, pairs, seed), truth

    say("rendering and embedding the evaluation images")
    held, held_truth = task(shapes.HELD_OUT_COMPOSITIONS, EVAL_SEED + 1)
    seen, seen_truth = task(shapes.SEEN_COMPOSITIONS, EVAL_SEED + 2)
    word_truth = rng.integers(0, len(MADE_UP_WORDS), images_per_task)
    words = _embed(encode_images, [WORD_COMPOSITIONS[i] for i in word_truth], EVAL_SEED + 3)

    results: dict[int, dict[str, float]] = {}
    for count in EXAMPLE_COUNTS:
        say(f"{count} examples per label")
        pairs = [pair for pair in shapes.ALL_COMPOSITIONS for _ in range(count)]
        examples = _embed(encode_images, pairs, EXAMPLE_SEED + count) if count else np.zeros((0, text.shape[1]))
        labels = np.repeat(np.arange(len(COMPOSITION_LABELS)), count)
        word_pairs = [pair for pair in WORD_COMPOSITIONS for _ in range(count)]
        word_examples = _embed(encode_images, word_pairs, EXAMPLE_SEED + 100 + count) if count else examples
        word_labels = np.repeat(np.arange(len(MADE_UP_WORDS)), count)
        row = {
            "held_out": _accuracy(held, held_truth, matrix=blend(text, examples, labels)),
            "seen": _accuracy(seen, seen_truth, matrix=blend(text, examples, labels)),
            "words": _accuracy(words, word_truth, matrix=blend(words_text, word_examples, word_labels)),
        }
        if count:
            row["held_out_tip"] = _accuracy(held, held_truth, tip_adapter(held, text, examples, labels, logit_scale))
            if count > 1:  # a covariance needs at least two examples of a label
                row["held_out_gda"] = _accuracy(
                    held, held_truth, gaussian_head(held, text, examples, labels, logit_scale)
                )
        results[count] = row
    return results


def markdown_report(results: dict[int, dict[str, float]], header: str) -> str:
    def cell(row: dict[str, float], key: str) -> str:
        return f"{row[key]:.1%}" if key in row else "—"

    lines = [
        header,
        "",
        f"Method: `models.fewshot.blend`, weight {DEFAULT_WEIGHT:g} (each label's text vector plus sqrt(examples) x "
        "its normalised mean example embedding, renormalised). Targets from issue 11: held-out ≥ 95 % with 1 "
        "example and ≥ 97 % with 4, seen ≥ 99 %, made-up words ≥ 95 %. The 32-example row is far more than a few: "
        "even there no method reaches 97 % on held-out compositions. The zero-shot errors are mostly small hexagons "
        "taken for circles and back, which this image encoder's embeddings barely separate.",
        "",
        "| examples per label | held-out compositions (40-way) | seen compositions (40-way) | made-up words (10-way) "
        "| held-out, Tip-Adapter | held-out, Gaussian head |",
        "|---|---|---|---|---|---|",
    ]
    for count, row in results.items():
        cells = " | ".join(cell(row, key) for key in ("held_out", "seen", "words", "held_out_tip", "held_out_gda"))
        lines.append(f"| {'zero-shot' if count == 0 else count} | {cells} |")
    return "\n".join(lines) + "\n"
