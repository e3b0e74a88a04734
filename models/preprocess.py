"""Image preprocessing, torch-free: the same pixels open_clip's eval transform produces.

open_clip (torchvision) does, in this order: resize (shortest side to `image_size`, bicubic, on the PIL
image in its own mode), centre crop, convert to RGB, scale to [0, 1], normalise by mean/std. We replay the
same Pillow operations in the same order, so every mode (RGBA, P, L, CMYK, 16-bit) goes through Pillow's
own resize for that mode exactly as the reference does; only the last two steps are numpy. We also apply
the EXIF orientation first, which the reference leaves to the caller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps

OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

Interpolation = Literal["bicubic", "bilinear", "nearest"]
ResizeMode = Literal["shortest", "squash"]

_PIL_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: Interpolation = "bicubic"
    resize_mode: ResizeMode = "shortest"
    # Not part of the reference transform; on by default because phones write EXIF-rotated JPEGs.
    apply_exif_orientation: bool = field(default=True)

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size <= 0:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        if self.interpolation not in _PIL_FILTERS:
            raise ValueError(f"unsupported interpolation {self.interpolation!r}")
        if self.resize_mode not in ("shortest", "squash"):
            raise ValueError(f"unsupported resize_mode {self.resize_mode!r}")
        values = (*self.mean, *self.std)
        if len(self.mean) != 3 or len(self.std) != 3 or not all(math.isfinite(v) for v in values):
            raise ValueError("mean and std need three finite values each")
        if any(s <= 0 for s in self.std):
            raise ValueError("std must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("mean", "std"):
            if key in known:
                known[key] = tuple(float(v) for v in known[key])
        return cls(**known)


def _resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    # torchvision's rule: the short side becomes `size`, the long side is truncated, not rounded.
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resized_pixels(width: int, height: int, config: PreprocessConfig) -> int:
    """Pixels of the intermediate resized image: a 1x100000 strip becomes 224 x 22 million before the crop."""
    if config.resize_mode == "squash":
        return config.image_size**2
    resized_width, resized_height = _resized_size(width, height, config.image_size)
    return resized_width * resized_height


def _centre_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return left, top, left + size, top + size


def resize_and_crop(image: Image.Image, config: PreprocessConfig) -> Image.Image:
    """Geometry only, in the image's own mode; returns an RGB image of `image_size` squared."""
    if config.apply_exif_orientation:
        image = ImageOps.exif_transpose(image)
    size = config.image_size
    resample = _PIL_FILTERS[config.interpolation]
    if config.resize_mode == "squash":
        image = image.resize((size, size), resample)
    else:
        width, height = image.size
        image = image.resize(_resized_size(width, height, size), resample)
        width, height = image.size  # never smaller than `size`: the long side is scaled up, then truncated
        image = image.crop(_centre_crop_box(width, height, size))
    return image.convert("RGB")


class ImageTransform:
    """PIL image -> float32 array [3, H, W], normalised; `batch` stacks several into [B, 3, H, W]."""

    def __init__(self, config: PreprocessConfig) -> None:
        self.config = config
        self._mean = np.asarray(config.mean, dtype=np.float32).reshape(3, 1, 1)
        self._std = np.asarray(config.std, dtype=np.float32).reshape(3, 1, 1)

    def to_uint8(self, image: Image.Image) -> np.ndarray:
        """[H, W, 3] uint8 after geometry: a compact form to store or ship before normalising."""
        return np.asarray(resize_and_crop(image, self.config), dtype=np.uint8)

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [..., H, W, 3] -> float32 [..., 3, H, W], the way ToTensor + Normalize compute it."""
        chw = np.moveaxis(pixels, -1, -3).astype(np.float32) / np.float32(255.0)
        return (chw - self._mean) / self._std

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.normalise(self.to_uint8(image))

    def batch(self, images: Sequence[Image.Image]) -> np.ndarray:
        return np.stack([self(image) for image in images])
