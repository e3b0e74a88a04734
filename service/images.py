"""Turning uploaded bytes into model input, with every way that can fail mapped to a client error.

Runs in worker threads (never on the event loop): Pillow's decode and the resize are the CPU-heavy part of
a request.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from models.preprocess import ImageTransform, PreprocessConfig, resized_pixels
from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType

# What Pillow decodes reliably and clients actually send; everything else (EPS, PSD, ...) is refused as 415.
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)


@dataclass(frozen=True)
class ImageInput:
    """One image as a client sent it: the file's bytes (multipart) or base64 text (JSON), and the request field
    it came in (`images[0]`), which every error about it names."""

    data: bytes | str
    param: str

    @property
    def field(self) -> str:
        return self.param.partition("[")[0]

    def decoded(self) -> bytes:
        """The image file's bytes; called in a worker thread (base64 of a large image is milliseconds)."""
        return self.data if isinstance(self.data, bytes) else decode_base64(self.data, self.param)


def decode_base64(text: str, param: str) -> bytes:
    """Plain base64 or a data: URL (`data:image/png;base64,...`)."""
    match = _DATA_URL.match(text)
    if match:
        mime = (match.group("mime") or "").lower()
        if mime and not mime.startswith("image/"):
            raise UnsupportedMediaType(f"{param}: data URL of type {mime} is not an image", param=param)
        if not match.group("b64"):
            raise InvalidInput(f"{param}: data URL must be base64-encoded", param=param)
        text = text[match.end() :]
    try:
        # Line-wrapped base64 (what `base64` and many encoders emit) is valid; strict about everything else.
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidInput(f"{param}: not valid base64 ({error})", param=param) from error


def is_image_data_url(text: str) -> bool:
    return text[:11].lower() == "data:image/"


def undecodable(param: str, error: BaseException) -> InvalidInput:
    return InvalidInput(f"{param}: cannot decode the image ({type(error).__name__}: {error})", param=param)


def decode_image(data: bytes, *, max_pixels: int, param: str, load: bool = True) -> Image.Image:
    """Bytes -> a Pillow image, checked (format, pixel limit) from its headers before anything is decoded;
    `load=False` stops there (the GPU preprocessing path decodes the pixels itself)."""
    if not data:
        raise InvalidInput(f"{param}: empty image", param=param)
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice it; we apply our own limit below instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ALLOWED_FORMATS:
                supported = ", ".join(sorted(ALLOWED_FORMATS))
                raise UnsupportedMediaType(
                    f"{param}: {image.format} images are not supported; send one of {supported}", param=param
                )
            width, height = image.size
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"{param}: {width}x{height} is {width * height:,} pixels; the limit is {max_pixels:,}", param=param
                )
            if load:
                image.load()
    except (InvalidInput, UnsupportedMediaType, PayloadTooLarge):
        raise
    except UnidentifiedImageError as error:
        raise InvalidInput(f"{param}: cannot decode the image (not a supported image file)", param=param) from error
    except Image.DecompressionBombError as error:
        raise PayloadTooLarge(f"{param}: image is too large to decode safely", param=param) from error
    except Exception as error:
        # Corrupt files surface from Pillow's decoders as OSError, SyntaxError, EOFError, struct.error,
        # TypeError...: whatever the decoder trips on, the fault is in the upload.
        raise undecodable(param, error) from error
    return image


def check_intermediate_size(width: int, height: int, config: PreprocessConfig, *, max_pixels: int, param: str) -> None:
    """The resize comes before the crop (as in open_clip), so a tiny 1x100000 strip would be blown up to
    gigabytes first: bound the intermediate image by the same pixel limit."""
    intermediate = resized_pixels(width, height, config)
    if intermediate > max_pixels:
        raise PayloadTooLarge(
            f"{param}: a {width}x{height} image would be resized to {intermediate:,} pixels before "
            f"cropping; the limit is {max_pixels:,} (aspect ratio too extreme)",
            param=param,
        )


def preprocess(data: bytes, transform: ImageTransform, *, max_pixels: int, param: str) -> np.ndarray:
    """Bytes -> float32 [3, S, S] for the image engine."""
    image = decode_image(data, max_pixels=max_pixels, param=param)
    check_intermediate_size(image.width, image.height, transform.config, max_pixels=max_pixels, param=param)
    try:
        return transform(image)
    except Exception as error:  # e.g. corrupt EXIF (struct.error) or a frame that fails only when resized
        raise undecodable(param, error) from error
