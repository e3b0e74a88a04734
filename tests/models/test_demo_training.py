"""The trainer's pieces and a three-step run; the real 16-minute training is never repeated in tests."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")

from models.demo import checkpoint  # noqa: E402
from models.demo.train import Recipe, _augment, _learning_rate, contrastive_loss, train  # noqa: E402


def test_loss_with_one_caption_per_image_is_the_papers_symmetric_cross_entropy():
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    texts = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    scale = torch.tensor(10.0)
    logits = scale * images @ texts.T
    labels = torch.arange(6)
    cross_entropy = torch.nn.functional.cross_entropy
    paper = (cross_entropy(logits, labels) + cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(contrastive_loss(images, texts, scale, torch.eye(6)), paper)


def test_a_caption_matching_two_images_spreads_its_target_over_both():
    g = torch.Generator().manual_seed(1)
    images = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=1)
    texts = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=1)
    scale = torch.tensor(5.0)
    matches = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # caption 1 fits images 0 and 1
    log_p_image = torch.log_softmax(scale * images @ texts.T, dim=1)
    log_p_text = torch.log_softmax(scale * texts @ images.T, dim=1)
    image_side = -(0.5 * (log_p_image[0, 0] + log_p_image[0, 1]) + log_p_image[1, 1] + log_p_image[2, 2]) / 3
    text_side = -(log_p_text[0, 0] + 0.5 * (log_p_text[1, 0] + log_p_text[1, 1]) + log_p_text[2, 2]) / 3
    expected = (image_side + text_side) / 2
    assert torch.allclose(contrastive_loss(images, texts, scale, matches), expected)


def test_learning_rate_warms_up_then_decays_to_zero():
    recipe = Recipe(steps=100, warmup_steps=10, learning_rate=1.0)
    assert _learning_rate(recipe, 0) == pytest.approx(0.1)
    assert _learning_rate(recipe, 9) == pytest.approx(1.0)
    assert _learning_rate(recipe, 55) < 1.0
    assert _learning_rate(recipe, 100) == pytest.approx(0.0, abs=1e-9)


def test_augment_keeps_shape_and_content():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    out = _augment(rng, pixels, shift=2)
    assert out.shape == pixels.shape and out.dtype == np.uint8
    assert not np.array_equal(out, pixels)


def test_training_is_reproducible_from_its_seed(tmp_path):
    recipe = Recipe(steps=2, batch_size=8, pool_size=16, warmup_steps=1, workers=1)
    train(recipe, tmp_path / "a")
    train(recipe, tmp_path / "b")
    first, second = checkpoint.load(tmp_path / "a").state_dict(), checkpoint.load(tmp_path / "b").state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_a_short_training_run_saves_a_loadable_model(tmp_path):
    card = train(Recipe(steps=3, batch_size=16, pool_size=48, warmup_steps=1, workers=1), tmp_path)
    assert card["training"]["history"][-1]["step"] == 2
    assert card["reproduce"] == "clipserve train-demo --seed 0 --steps 3"
    model = checkpoint.load(tmp_path)
    assert model.logit_scale.exp().item() <= 100.0 + 1e-3
    with torch.inference_mode():
        embedding = model.encode_image(torch.zeros(1, 3, 64, 64), normalize=True)
    assert embedding.shape == (1, 64)
