"""models.preprocess must produce the same pixels as open_clip's eval transform (the reference).

The reference is `open_clip.transform.image_transform(..., is_train=False)`: Resize (shortest side, or
squash), CenterCrop, convert("RGB"), ToTensor, Normalize. open_clip does not apply EXIF orientation, our
transform does, so EXIF cases compare against the reference applied to `ImageOps.exif_transpose(image)`.

Every comparison asserts max |ours - reference| <= 1e-5. Images are synthetic and seeded (gradients for the
filter weights, a checkerboard and a diagonal step for hard edges where a resampling difference would show,
plus noise), and everything "encoded" is encoded here by Pillow, in memory or under tmp_path.
"""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps, features

from models.preprocess import OPENAI_MEAN, OPENAI_STD, ImageTransform, PreprocessConfig

TOLERANCE = 1e-5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXIF_ORIENTATION = 0x0112
REPO_ROOT = Path(__file__).resolve().parents[2]

CONFIGS = {
    "224-bicubic-shortest": PreprocessConfig(),
    "64-bicubic-shortest": PreprocessConfig(image_size=64),
    "240-bilinear-shortest-imagenet": PreprocessConfig(
        image_size=240, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear"
    ),
    "256-bicubic-squash-half": PreprocessConfig(
        image_size=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize_mode="squash"
    ),
    "64-bilinear-squash": PreprocessConfig(image_size=64, interpolation="bilinear", resize_mode="squash"),
}

# One of each: default shortest/bicubic, squash/bilinear at a small size, and non-default mean/std.
MIXED_CONFIGS = ["224-bicubic-shortest", "64-bilinear-squash", "240-bilinear-shortest-imagenet"]
# For the mode and file matrices: each resize mode and filter once. Mean/std act after convert("RGB"), so they
# do not interact with the mode and the RGB matrix covers them.
MODE_CONFIGS = ["224-bicubic-shortest", "64-bilinear-squash"]

# (width, height): degenerate, smaller than, equal to and just around each target size, odd, very wide or
# tall, and large. Kept so that a 1-pixel side does not blow up into a huge intermediate image.
SIZES = [
    (1, 1),
    (1, 9),
    (9, 1),
    (2, 3),
    (7, 5),
    (31, 47),
    (63, 64),
    (64, 64),
    (65, 63),
    (223, 224),
    (224, 224),
    (225, 300),
    (240, 239),
    (256, 256),
    (333, 129),
    (1000, 50),
    (50, 1000),
    (1200, 900),
    (899, 1201),
]

# Largest difference seen by any comparison in this module; printed at teardown (visible with -s).
_observed_diffs: list[float] = []


# --------------------------------------------------------------------------------------------------------
# Synthetic images
# --------------------------------------------------------------------------------------------------------


@cache
def structured_rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    """uint8 [H, W, 3]: gradients, a checkerboard, a diagonal step and noise; deterministic."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    red = 255.0 * x / max(width - 1, 1)
    green = 255.0 * y / max(height - 1, 1)
    checker = (((x // 3) + (y // 3)) % 2) * 255.0
    diagonal = np.where(x * height > y * width, 230.0, 20.0)
    blue = 0.5 * checker + 0.5 * diagonal
    noise = rng.normal(0.0, 25.0, (height, width, 3))
    pixels = np.clip(np.stack([red, green, blue], axis=-1) + noise, 0, 255).astype(np.uint8)
    pixels.setflags(write=False)  # cached and shared between tests: nobody may change it
    return pixels


def alpha_channel(width: int, height: int, seed: int = 0) -> Image.Image:
    """Alpha that sweeps 0..255 with noise and has fully transparent and fully opaque bands, so the
    premultiplied-alpha resize Pillow uses for RGBA/LA actually changes colours."""
    rng = np.random.default_rng(seed + 1)
    x = np.arange(width, dtype=np.float64)[None, :].repeat(height, axis=0)
    alpha = 255.0 * x / max(width - 1, 1) + rng.normal(0.0, 30.0, (height, width))
    band = height // 10  # none on tiny images, where the sweep and noise alone vary alpha
    alpha[:band, :] = 0
    alpha[height - band :, :] = 255
    return Image.fromarray(np.clip(alpha, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str, **save_kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_kwargs)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def png_16bit(samples: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand: Pillow only writes 16-bit grayscale, and we want 16-bit colour too.

    samples: uint16 [H, W] (gray), [H, W, 2] (gray+alpha), [H, W, 3] (RGB) or [H, W, 4] (RGBA).
    """
    height, width = samples.shape[:2]
    channels = 1 if samples.ndim == 2 else samples.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = samples.reshape(height, -1).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def samples_16bit(width: int, height: int, channels: int, full_range: bool) -> np.ndarray:
    """uint16 samples from the structured image: full range (x257) or a low range straddling 255, which is
    where Pillow's 16-bit -> 8-bit conversion clips."""
    rgb = structured_rgb(width, height).astype(np.uint32)
    alpha = np.asarray(alpha_channel(width, height), dtype=np.uint32)[..., None]
    planes = {
        1: rgb[..., :1],
        2: np.concatenate([rgb[..., :1], alpha], -1),
        3: rgb,
        4: np.concatenate([rgb, alpha], -1),
    }
    values = (planes[channels] * (257 if full_range else 2)).astype(np.uint16)
    return values[..., 0] if channels == 1 else values


def make_image(mode: str, width: int, height: int) -> Image.Image:
    """A synthetic image in `mode` (or a named variant: 'P+transparency', 'I;16-png', ...).

    A fresh copy each time: tests set EXIF tags and palette transparency on what they get back."""
    return _build_image(mode, width, height).copy()


@cache  # quantizing for P / PA is the slowest part of this module; build each image once
def _build_image(mode: str, width: int, height: int) -> Image.Image:
    rgb = Image.fromarray(structured_rgb(width, height))
    if mode == "RGB":
        return rgb
    if mode == "RGBA":
        rgba = rgb.copy()
        rgba.putalpha(alpha_channel(width, height))
        return rgba
    if mode == "LA":
        return Image.merge("LA", (rgb.convert("L"), alpha_channel(width, height)))
    if mode == "P":
        return rgb.quantize(colors=64)  # median cut: deterministic
    if mode == "P+transparency":
        palette = _build_image("P", width, height).copy()
        palette.info["transparency"] = 5
        return palette
    if mode == "PA":
        return _build_image("RGBA", width, height).convert("PA")
    if mode == "CMYK":
        # A K channel that varies (Pillow's RGB -> CMYK leaves K at 0), and C/M/Y with their own noise.
        planes = np.concatenate([structured_rgb(width, height, 1), structured_rgb(width, height, 2)[..., :1]], -1)
        return Image.frombytes("CMYK", (width, height), np.ascontiguousarray(planes).tobytes())
    if mode == "1":
        return rgb.convert("1")  # Floyd-Steinberg dithered: lots of edges
    if mode == "I;16-png":
        # Saved and decoded through Pillow's PNG codec, so the mode is what a decoder produces.
        image = decode(encode(Image.fromarray(samples_16bit(width, height, 1, full_range=False)), "PNG"))
        assert image.mode == "I;16"
        return image
    if mode == "I;16-png-full-range":
        image = decode(encode(Image.fromarray(samples_16bit(width, height, 1, full_range=True)), "PNG"))
        assert image.mode == "I;16"
        return image
    if mode == "I;16B":
        samples = samples_16bit(width, height, 1, full_range=False).astype(">u2")
        return Image.frombytes("I;16B", (width, height), samples.tobytes())
    if mode == "I":
        # 32-bit signed, with negatives and values above 255.
        values = structured_rgb(width, height)[..., 0].astype(np.int32) * 3 - 200
        return Image.fromarray(values)
    if mode == "F":
        values = structured_rgb(width, height)[..., 1].astype(np.float32) * 1.3 - 20.25
        return Image.fromarray(values)
    if mode in ("RGBX", "YCbCr", "HSV", "LAB", "RGBa", "La", "L"):
        return rgb.convert(mode) if mode != "La" else _build_image("LA", width, height).convert("La")
    raise AssertionError(f"no builder for {mode}")


# --------------------------------------------------------------------------------------------------------
# Reference and comparison
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_clip():
    # Only the comparisons need open_clip (and torch); the config tests run in the slim install.
    return pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def reference_transform(open_clip) -> Callable[[PreprocessConfig], Callable[[Image.Image], np.ndarray]]:
    """config -> (PIL image -> float32 [3, H, W]) through open_clip's eval transform, built once per config."""
    built: dict[PreprocessConfig, Callable[[Image.Image], np.ndarray]] = {}

    def get(config: PreprocessConfig) -> Callable[[Image.Image], np.ndarray]:
        if config not in built:
            transform = open_clip.transform.image_transform(
                config.image_size,
                is_train=False,
                mean=config.mean,
                std=config.std,
                resize_mode=config.resize_mode,
                interpolation=config.interpolation,
            )
            built[config] = lambda image: transform(image).numpy()
        return built[config]

    return get


@pytest.fixture(scope="module", autouse=True)
def _report_observed_difference():
    yield
    if _observed_diffs:
        print(f"\n[test_preprocess] {len(_observed_diffs)} comparisons, max abs diff {max(_observed_diffs):.3g}")


def assert_matches(ours: np.ndarray, expected: np.ndarray) -> None:
    assert ours.dtype == np.float32
    assert ours.shape == expected.shape
    diff = float(np.max(np.abs(ours - expected)))
    _observed_diffs.append(diff)
    assert diff <= TOLERANCE, f"max abs diff {diff} > {TOLERANCE}"


def check_against_reference(
    reference_transform, config: PreprocessConfig, image: Image.Image, reference_input: Image.Image | None = None
) -> np.ndarray:
    """Compare ours(image) with reference(reference_input or image); returns ours."""
    ours = ImageTransform(config)(image)
    expected = reference_transform(config)(image if reference_input is None else reference_input)
    assert ours.shape == (3, config.image_size, config.image_size)
    assert_matches(ours, expected)
    return ours


# --------------------------------------------------------------------------------------------------------
# Geometry: sizes, aspect ratios, target sizes, interpolation, resize mode
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_rgb_matches_reference_for_every_size(reference_transform, config_name, size):
    check_against_reference(reference_transform, CONFIGS[config_name], make_image("RGB", *size))


# RGBA goes through Pillow's premultiplied-alpha resize, a different code path from RGB: cover the
# geometry for it too (a subset of sizes keeps the runtime down).
RGBA_SIZES = [(1, 1), (2, 3), (7, 5), (65, 63), (224, 224), (1000, 50), (899, 1201)]


@pytest.mark.parametrize("config_name", MIXED_CONFIGS)
@pytest.mark.parametrize("size", RGBA_SIZES, ids=[f"{w}x{h}" for w, h in RGBA_SIZES])
def test_rgba_matches_reference_for_sizes(reference_transform, config_name, size):
    check_against_reference(reference_transform, CONFIGS[config_name], make_image("RGBA", *size))


def test_image_transform_v2_is_the_same_reference(open_clip, reference_transform):
    # The brief names both entry points; make sure the one we compare against agrees with the other.
    config = CONFIGS["240-bilinear-shortest-imagenet"]
    cfg = open_clip.transform.PreprocessCfg(
        size=config.image_size,
        mean=config.mean,
        std=config.std,
        interpolation=config.interpolation,
        resize_mode=config.resize_mode,
    )
    v2 = open_clip.transform.image_transform_v2(cfg, is_train=False)
    image = make_image("RGB", 333, 129)
    assert np.array_equal(v2(image).numpy(), reference_transform(config)(image))
    check_against_reference(reference_transform, config, image)


def test_shortest_side_crop_matches_on_both_orientations(reference_transform):
    # Wide vs tall of the same content: the centre crop must come from the middle of the long side, with
    # torchvision's rounding of an odd margin, in both directions.
    config = CONFIGS["64-bicubic-shortest"]
    wide = make_image("RGB", 201, 64)
    ours_wide = check_against_reference(reference_transform, config, wide)
    ours_tall = check_against_reference(reference_transform, config, wide.transpose(Image.Transpose.TRANSPOSE))
    assert_matches(ours_tall, np.swapaxes(ours_wide, 1, 2))


def test_nearest_interpolation_matches_torchvision_nearest(open_clip, reference_transform):
    # Our config also accepts "nearest", which open_clip's image_transform refuses (it asserts
    # interpolation in bicubic/bilinear/random). The closest reference is open_clip's own pipeline with its
    # Resize switched to torchvision's NEAREST, which is what we compare against.
    from torchvision.transforms import InterpolationMode, Resize

    with pytest.raises(AssertionError):
        open_clip.transform.image_transform(64, is_train=False, interpolation="nearest")

    for resize_mode in ("shortest", "squash"):
        config = PreprocessConfig(image_size=64, interpolation="nearest", resize_mode=resize_mode)
        pipeline = open_clip.transform.image_transform(64, is_train=False, resize_mode=resize_mode)
        assert isinstance(pipeline.transforms[0], Resize)
        pipeline.transforms[0].interpolation = InterpolationMode.NEAREST
        for size in [(7, 5), (333, 129), (64, 64)]:
            image = make_image("RGB", *size)
            assert_matches(ImageTransform(config)(image), pipeline(image).numpy())


# --------------------------------------------------------------------------------------------------------
# Image modes
# --------------------------------------------------------------------------------------------------------

# Modes the reference handles: it resizes and crops in the image's own mode (Pillow forces NEAREST for "1"
# and "P", uses premultiplied alpha for RGBA/LA) and only then converts to RGB. Pillow's conversion to RGB
# clips I;16 / I / F samples to 0..255 rather than rescaling (so a full-range 16-bit image comes out mostly
# white); the reference does exactly that and we are required to match it, not to improve on it.
SUPPORTED_MODES = [
    "RGB",
    "RGBA",
    "RGBX",
    "RGBa",
    "L",
    "LA",
    "P",
    "P+transparency",
    "PA",
    "CMYK",
    "YCbCr",
    "HSV",
    "LAB",
    "1",
    "I;16-png",
    "I;16-png-full-range",
    "I;16B",
    "I",
    "F",
]
MODE_SIZES = [(1, 1), (2, 3), (7, 5), (63, 64), (333, 129), (50, 1000)]


@pytest.mark.parametrize("config_name", MODE_CONFIGS)
@pytest.mark.parametrize("size", MODE_SIZES, ids=[f"{w}x{h}" for w, h in MODE_SIZES])
@pytest.mark.parametrize("mode", SUPPORTED_MODES)
def test_mode_matches_reference(reference_transform, mode, size, config_name):
    image = make_image(mode, *size)
    check_against_reference(reference_transform, CONFIGS[config_name], image)


def test_16bit_is_clipped_like_the_reference(reference_transform):
    # Documents the (inherited) behaviour above: 16-bit samples above 255 become 255, not value / 257.
    # A 6x1 image squashed to 6x6 is only stretched vertically, so every column keeps its exact value.
    samples = np.array([[0, 100, 255, 256, 1000, 65535]], dtype=np.uint16)
    image = decode(encode(Image.fromarray(samples), "PNG"))
    assert image.mode == "I;16"
    config = PreprocessConfig(image_size=6, resize_mode="squash")
    pixels = ImageTransform(config).to_uint8(image)
    expected_row = np.array([0, 100, 255, 255, 255, 255], dtype=np.uint8)
    assert np.array_equal(pixels, np.broadcast_to(expected_row[None, :, None], (6, 6, 3)))
    check_against_reference(reference_transform, config, image)


def test_premultiplied_la_mode_raises_like_the_reference(reference_transform):
    # "La" (premultiplied LA) has no conversion to RGB in Pillow: the reference raises ValueError from
    # convert("RGB"); we must fail the same way rather than return something different.
    image = make_image("La", 33, 21)
    config = CONFIGS["64-bicubic-shortest"]
    with pytest.raises(ValueError) as reference_error:
        reference_transform(config)(image)
    with pytest.raises(ValueError) as our_error:
        ImageTransform(config)(image)
    assert str(our_error.value) == str(reference_error.value)


# --------------------------------------------------------------------------------------------------------
# Real encoded files (the service receives bytes)
# --------------------------------------------------------------------------------------------------------


def _with_transparency(image: Image.Image) -> Image.Image:
    image.info["transparency"] = 5
    return image


# (id, builder, format, save kwargs, mode Pillow decodes it to)
FILE_CASES = [
    ("jpeg-rgb", lambda w, h: make_image("RGB", w, h), "JPEG", {"quality": 90}, "RGB"),
    ("jpeg-rgb-420", lambda w, h: make_image("RGB", w, h), "JPEG", {"quality": 75, "subsampling": 2}, "RGB"),
    ("jpeg-l", lambda w, h: make_image("L", w, h), "JPEG", {"quality": 90}, "L"),
    ("jpeg-cmyk", lambda w, h: make_image("CMYK", w, h), "JPEG", {"quality": 90}, "CMYK"),
    ("png-rgb", lambda w, h: make_image("RGB", w, h), "PNG", {}, "RGB"),
    ("png-rgba", lambda w, h: make_image("RGBA", w, h), "PNG", {}, "RGBA"),
    ("png-l", lambda w, h: make_image("L", w, h), "PNG", {}, "L"),
    ("png-la", lambda w, h: make_image("LA", w, h), "PNG", {}, "LA"),
    ("png-p", lambda w, h: make_image("P", w, h), "PNG", {}, "P"),
    ("png-p-transparency", lambda w, h: make_image("P", w, h), "PNG", {"transparency": 5}, "P"),
    ("png-1", lambda w, h: make_image("1", w, h), "PNG", {}, "1"),
    ("png-i16", lambda w, h: Image.fromarray(samples_16bit(w, h, 1, full_range=False)), "PNG", {}, "I;16"),
    ("webp-rgb-lossy", lambda w, h: make_image("RGB", w, h), "WEBP", {"quality": 80}, "RGB"),
    ("webp-rgba-lossless", lambda w, h: make_image("RGBA", w, h), "WEBP", {"lossless": True}, "RGBA"),
    ("gif-p", lambda w, h: make_image("P", w, h), "GIF", {}, "P"),
    ("gif-p-transparency", lambda w, h: _with_transparency(make_image("P", w, h)), "GIF", {"transparency": 5}, "P"),
]
# 16-bit colour PNGs, hand-encoded: Pillow decodes them to 8 bits per channel (RGB / RGBA).
PNG16_CASES = [
    ("png16-gray", 1, "I;16"),
    ("png16-gray-alpha", 2, "RGBA"),
    ("png16-rgb", 3, "RGB"),
    ("png16-rgba", 4, "RGBA"),
]


@pytest.mark.parametrize("config_name", MODE_CONFIGS)
@pytest.mark.parametrize(
    ("builder", "fmt", "save_kwargs", "decoded_mode"), [case[1:] for case in FILE_CASES], ids=[c[0] for c in FILE_CASES]
)
def test_decoded_file_matches_reference(
    reference_transform, tmp_path, builder, fmt, save_kwargs, decoded_mode, config_name
):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    path = tmp_path / f"image.{fmt.lower()}"
    builder(333, 129).save(path, fmt, **save_kwargs)
    # Decode from the bytes, as the service does.
    image = decode(path.read_bytes())
    assert image.mode == decoded_mode, "the case no longer exercises the mode it is named after"
    check_against_reference(reference_transform, CONFIGS[config_name], image)


@pytest.mark.parametrize("config_name", MODE_CONFIGS)
@pytest.mark.parametrize(("channels", "decoded_mode"), [c[1:] for c in PNG16_CASES], ids=[c[0] for c in PNG16_CASES])
def test_16bit_png_file_matches_reference(reference_transform, tmp_path, channels, decoded_mode, config_name):
    path = tmp_path / "image16.png"
    path.write_bytes(png_16bit(samples_16bit(201, 117, channels, full_range=True)))
    image = decode(path.read_bytes())
    assert image.mode == decoded_mode
    check_against_reference(reference_transform, CONFIGS[config_name], image)


# --------------------------------------------------------------------------------------------------------
# EXIF orientation
# --------------------------------------------------------------------------------------------------------


def _with_orientation(image: Image.Image, fmt: str, orientation: int, **save_kwargs: object) -> Image.Image:
    exif = image.getexif()
    exif[EXIF_ORIENTATION] = orientation
    decoded = decode(encode(image, fmt, exif=exif, **save_kwargs))
    assert decoded.getexif().get(EXIF_ORIENTATION) == orientation
    return decoded


@pytest.mark.parametrize("config_name", ["64-bicubic-shortest", "224-bicubic-shortest"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_exif_orientation(reference_transform, orientation, config_name):
    # Non-square and asymmetric (gradients run left->right and top->bottom), so every one of the eight
    # orientations gives a different picture.
    decoded = _with_orientation(make_image("RGB", 97, 61), "JPEG", orientation, quality=92)
    decoded_pixels = decoded.tobytes()
    config = CONFIGS[config_name]

    upright = check_against_reference(reference_transform, config, decoded, ImageOps.exif_transpose(decoded))
    raw_config = dataclasses.replace(config, apply_exif_orientation=False)
    raw = check_against_reference(reference_transform, raw_config, decoded)

    # The tag must actually have had an effect, or the two checks above prove nothing about EXIF.
    if orientation == 1:
        assert np.array_equal(upright, raw)
    else:
        assert float(np.max(np.abs(upright - raw))) > 0.1
    # Our transform must not touch the caller's image (the tag stays, the pixels stay).
    assert decoded.getexif().get(EXIF_ORIENTATION) == orientation
    assert decoded.size == (97, 61)
    assert decoded.tobytes() == decoded_pixels


@pytest.mark.parametrize(
    ("fmt", "mode", "save_kwargs"),
    [("PNG", "RGBA", {}), ("WEBP", "RGB", {"quality": 90}), ("JPEG", "L", {"quality": 90}), ("JPEG", "CMYK", {})],
)
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_other_formats_and_modes(reference_transform, fmt, mode, save_kwargs, orientation):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    decoded = _with_orientation(make_image(mode, 97, 61), fmt, orientation, **save_kwargs)
    assert decoded.mode == mode
    config = CONFIGS["64-bilinear-squash"]
    check_against_reference(reference_transform, config, decoded, ImageOps.exif_transpose(decoded))
    raw_config = dataclasses.replace(config, apply_exif_orientation=False)
    check_against_reference(reference_transform, raw_config, decoded)


# --------------------------------------------------------------------------------------------------------
# to_uint8 / normalise / batch
# --------------------------------------------------------------------------------------------------------


def test_to_uint8_is_the_reference_geometry_exactly(open_clip):
    # The stored/shipped uint8 form must be bit-identical to the reference's PIL image just before ToTensor.
    config = CONFIGS["240-bilinear-shortest-imagenet"]
    pipeline = open_clip.transform.image_transform(
        config.image_size, is_train=False, mean=config.mean, std=config.std, interpolation=config.interpolation
    )
    geometry_only = pipeline.transforms[:-2]  # drop MaybeToTensor and Normalize
    transform = ImageTransform(config)
    for mode, size in [("RGB", (333, 129)), ("RGBA", (7, 5)), ("P", (50, 1000)), ("CMYK", (240, 240))]:
        image = make_image(mode, *size)
        expected = image
        for step in geometry_only:
            expected = step(expected)
        pixels = transform.to_uint8(image)
        assert pixels.dtype == np.uint8
        assert pixels.shape == (240, 240, 3)
        assert np.array_equal(pixels, np.asarray(expected))
        assert np.array_equal(transform.normalise(pixels), transform(image))


def test_normalise_handles_a_batch_of_uint8():
    transform = ImageTransform(CONFIGS["64-bicubic-shortest"])
    pixels = np.stack([transform.to_uint8(make_image(mode, 31, 47)) for mode in ("RGB", "L", "RGBA")])
    normalised = transform.normalise(pixels)
    assert normalised.shape == (3, 3, 64, 64)
    assert normalised.dtype == np.float32
    for index in range(3):
        assert np.array_equal(normalised[index], transform.normalise(pixels[index]))


def test_batch_shape_dtype_and_values(reference_transform):
    config = CONFIGS["224-bicubic-shortest"]
    images = [make_image("RGB", 333, 129), make_image("P", 7, 5), make_image("RGBA", 50, 1000), make_image("L", 1, 1)]
    batch = ImageTransform(config).batch(images)
    assert batch.shape == (4, 3, 224, 224)
    assert batch.dtype == np.float32
    expected = np.stack([reference_transform(config)(image) for image in images])
    assert_matches(batch, expected)


# --------------------------------------------------------------------------------------------------------
# PreprocessConfig
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_size": 0},
        {"image_size": -224},
        {"std": (0.5, 0.0, 0.5)},
        {"std": (0.5, -0.1, 0.5)},
        {"std": (0.5, 0.5)},
        {"mean": (0.5, 0.5, 0.5, 0.5)},
        {"interpolation": "lanczos"},
        {"interpolation": "random"},  # open_clip accepts it (= bicubic at eval); we ask for an explicit name
        {"resize_mode": "longest"},  # open_clip has it; we do not implement it, so refuse it loudly
        {"resize_mode": "crop"},
        {"image_size": 224.5},
        {"image_size": 224.0},
        {"image_size": True},
        {"image_size": "224"},
        {"std": (float("nan"), 0.5, 0.5)},
        {"mean": (0.5, float("inf"), 0.5)},
    ],
    ids=str,
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        PreprocessConfig(**kwargs)


def test_config_defaults_are_openai_clip():
    config = PreprocessConfig()
    assert config.image_size == 224
    assert config.mean == OPENAI_MEAN
    assert config.std == OPENAI_STD
    assert (config.interpolation, config.resize_mode, config.apply_exif_orientation) == ("bicubic", "shortest", True)


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_config_dict_round_trip(config_name):
    config = dataclasses.replace(CONFIGS[config_name], apply_exif_orientation=False)
    data = config.to_dict()
    assert set(data) == {f.name for f in dataclasses.fields(PreprocessConfig)}
    assert PreprocessConfig.from_dict(data) == config
    # Through JSON the tuples come back as lists; from_dict must restore an equal (and hashable) config.
    restored = PreprocessConfig.from_dict(json.loads(json.dumps(data)))
    assert restored == config
    assert isinstance(restored.mean, tuple) and isinstance(restored.std, tuple)
    hash(restored)


def test_config_from_dict_ignores_unknown_keys_and_fills_defaults():
    restored = PreprocessConfig.from_dict({"image_size": 64, "model": "ViT-B-32", "mode": "RGB"})
    assert restored == PreprocessConfig(image_size=64)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PreprocessConfig().image_size = 64  # type: ignore[misc]


def test_preprocess_module_does_not_import_torch():
    # The service installs without torch; this module must stay importable there.
    code = "import sys, models.preprocess; sys.exit('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr or "models.preprocess imported torch"
