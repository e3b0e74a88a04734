"""The committed demo model: present, small, reproducible, and actually classifying (never retrained here)."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")

from models.demo import evaluate  # noqa: E402
from models.demo.config import ARTIFACTS_DIR, CARD_FILE, WEIGHTS_FILE  # noqa: E402
from models.scoring import cosines  # noqa: E402
from models.tokenizer import ClipTokenizer, open_clip_tokenizer_json  # noqa: E402
from models.zoo import load_demo  # noqa: E402

DEMO_BUDGET_BYTES = 40 * 1024 * 1024  # everything committed for the demo model, weights and later exports


@pytest.fixture(scope="module")
def demo():
    return load_demo()


@pytest.fixture(scope="module")
def encoders(demo):
    return demo.numpy_encoders(ClipTokenizer.from_json(open_clip_tokenizer_json()))


def test_artifacts_are_committed_small_and_fp16():
    files = [p for p in ARTIFACTS_DIR.rglob("*") if p.is_file()]
    assert {WEIGHTS_FILE, CARD_FILE} <= {p.name for p in files}
    assert sum(p.stat().st_size for p in files) < DEMO_BUDGET_BYTES
    from safetensors import safe_open

    with safe_open(str(ARTIFACTS_DIR / WEIGHTS_FILE), "pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"F16"}  # noqa: SIM118


def test_card_says_how_to_reproduce_and_how_long_it_took():
    card = json.loads((ARTIFACTS_DIR / CARD_FILE).read_text())
    assert card["reproduce"].startswith("clipserve train-demo --seed ")
    assert str(card["recipe"]["seed"]) in card["reproduce"]
    assert card["training"]["total_seconds"] <= 20 * 60
    assert len(card["held_out_compositions"]) >= 6


def test_demo_model_loads_through_the_zoo(demo):
    assert demo.preprocess.image_size == 64
    assert demo.tokenizer.context_length == 32
    assert demo.activation == "softmax"
    assert 1.0 < demo.logit_scale <= 100.0


def test_demo_classifies_fresh_renderings_zero_shot(encoders):
    encode_images, encode_texts = encoders
    results = evaluate.evaluate(
        encode_images, encode_texts, images_per_task=100, seed=7, distributions=[evaluate.TRAINING_LIKE]
    )
    ensemble = {task: scores["80-template ensemble"] for task, scores in results[evaluate.TRAINING_LIKE].items()}
    # 100 images per task (the committed report uses 1,000): allow a few points below each target.
    for task, target in evaluate.TARGETS.items():
        assert ensemble[task] >= target - 0.06, (task, ensemble)


def test_demo_probabilities_rank_the_true_label_first(demo, encoders):
    encode_images, encode_texts = encoders
    pixels, truth = evaluate.render_set(evaluate.TASKS[0], 8, seed=11)
    labels = list(evaluate.COMPOSITION_LABELS)
    classes = evaluate.label_matrix(encode_texts, labels, ["a photo of a {}."])
    probabilities = demo.scoring.probabilities(cosines(encode_images(pixels), classes))
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    top = [labels[i] for i in probabilities.argmax(axis=1)]
    assert np.mean(np.asarray(top) == np.asarray(truth)) >= 0.75
