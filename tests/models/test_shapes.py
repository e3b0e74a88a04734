import numpy as np

from models.demo import shapes


def test_held_out_compositions_cover_every_colour_and_shape_and_are_never_seen():
    assert len(shapes.HELD_OUT) >= 6
    assert {c for c, _ in shapes.HELD_OUT} == set(shapes.COLOURS)
    assert {s for _, s in shapes.HELD_OUT} == set(shapes.SHAPES)
    assert not set(shapes.SEEN_COMPOSITIONS) & shapes.HELD_OUT
    assert len(shapes.SEEN_COMPOSITIONS) + len(shapes.HELD_OUT_COMPOSITIONS) == 40


def test_rendering_is_deterministic_for_a_seed():
    a = shapes.render(np.random.default_rng(7), "red", "circle")
    b = shapes.render(np.random.default_rng(7), "red", "circle")
    assert a.attributes == b.attributes
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_renderings_vary_in_size_aspect_and_background():
    rng = np.random.default_rng(0)
    samples = [shapes.render(rng, "blue", "star") for _ in range(60)]
    sizes = {s.image.size for s in samples}
    assert len(sizes) > 40
    assert min(min(s.image.size) for s in samples) >= 40
    assert max(max(s.image.size) for s in samples) <= 320 * 1.7 + 1
    assert {s.attributes.background for s in samples} == {"solid", "gradient", "noise"}
    assert all(s.image.mode == "RGB" for s in samples)


def test_the_shape_is_drawn_in_its_colour_inside_the_centre_square():
    rng = np.random.default_rng(3)
    for _ in range(20):
        sample = shapes.render(rng, "red", "square", min_side=200, max_side=200)
        pixels = np.asarray(sample.image).astype(int)
        w, h = sample.image.size
        side = min(w, h)
        x0, y0 = (w - side) // 2, (h - side) // 2
        centre = pixels[y0 : y0 + side, x0 : x0 + side]
        redness = (centre[..., 0] > 150) & (centre[..., 1] < 90) & (centre[..., 2] < 90)
        outside = redness.sum()
        assert outside > 0.02 * side * side  # the shape is inside the crop the model sees


def test_captions_state_only_true_attributes():
    rng = np.random.default_rng(1)
    sample = shapes.render(rng, "green", "hexagon")
    for _ in range(200):
        caption = shapes.caption(rng, sample.attributes)
        assert caption.matches(sample.attributes)
        assert caption.attributes, caption
        for value in caption.attributes.values():
            assert value in caption.text
    other = shapes.Attributes("red", "hexagon", "small", "solid", "grey")
    texts = {shapes.caption(rng, sample.attributes).text for _ in range(300)}
    assert len(texts) > 25  # many phrasings
    assert not shapes.Caption("a green hexagon", {"colour": "green", "shape": "hexagon"}).matches(other)
    assert shapes.Caption("a hexagon", {"shape": "hexagon"}).matches(other)
