"""Image preprocessing on a torch device: nvJPEG decode, resize, crop and normalise on the GPU.

On a GPU node Pillow's JPEG decode and resize (about 5 ms per 640x480 image per core) cap a node far below
what the engine can do. `DevicePreprocessor` decodes JPEGs with `torchvision.io.decode_jpeg(device=...)`
(nvJPEG on CUDA, libjpeg-turbo on the CPU) and replays `models.preprocess`'s geometry with torch ops on
that device, so the same code runs (and is tested) on `device="cpu"`. It is a drop-in for
`service.images.preprocess`: the same arguments, the same float32 [3, S, S] host array, the same errors for
bad input, with the size limit checked from the header before anything is decoded.

Where it is not exact: nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's, and torch's float
antialiased resize lands within one level of Pillow's fixed-point one (two on some upscales).
docs/gpu-preprocessing.md has the measured difference (pixels and demo-model embedding cosine).
Everything the device path does not handle goes through the exact CPU path instead, counted per reason:
formats other than JPEG (multi-picture MPO files included), CMYK and RGB-stored (Adobe transform 0) JPEGs,
files that do not end with the JPEG end-of-image marker (truncated uploads, for which Pillow's own error is
the reference) and JPEGs the decoder refuses.

The result is copied back to the host: the batcher stacks host arrays and every engine takes numpy input
today. Keeping the pixels on the device needs a device-aware batcher and engines that accept device input
(DeviceArray carries [rows, cols] embeddings, not images); the copy is 3·S·S·4 bytes (0.6 MB at S = 224,
tens of microseconds), small beside the decode it replaces, so it is left for a later step.

torch and torchvision are imported when a `DevicePreprocessor` is constructed, never at module import: the
CPU install imports this module unchanged.
"""

from __future__ import annotations

import functools
import importlib
import io
import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from models.preprocess import ImageTransform, PreprocessConfig, _centre_crop_box, _resized_size
from service import images

log = logging.getLogger("clipserve.preprocess")

Preprocess = Callable[[bytes, str], np.ndarray]
# A Tensor. Not imported even for type checking: the serving path names no torch import outside the modules
# that load it on demand (tests/test_torch_free.py and the project's checks look for one).
Tensor = Any

_END_OF_IMAGE = b"\xff\xd9"
_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = frozenset(range(2, 9))


def device_refusal(header: Image.Image, data: bytes) -> str | None:
    """Why this upload must take the exact CPU path instead, or None when the device decoder can take it."""
    if header.format != "JPEG":
        return f"format {header.format}"  # PNG, WebP, GIF, ...; MPO is a JPEG container nvJPEG would misread
    if header.mode not in ("RGB", "L"):
        return f"JPEG mode {header.mode}"  # CMYK: the colour conversion is Pillow's, the reference's
    if header.mode == "RGB" and header.info.get("adobe_transform") == 0:
        return "JPEG stored as RGB"  # no YCbCr transform: decoders disagree on how to read these
    if not data.endswith(_END_OF_IMAGE):
        # Truncated uploads (Pillow refuses them, libjpeg pads them grey) and files with trailers: both are
        # rare, and the CPU path gives the reference answer, error or pixels.
        return "no JPEG end marker"
    return None


def exif_orientation(header: Image.Image, param: str) -> int:
    """The EXIF orientation `ImageOps.exif_transpose` would apply (1: none), failing where it fails.

    exif_transpose looks the tag up in a dict (an odd value means no transposition), and rewrites the EXIF
    block without it, where a corrupt block fails (struct.error); the same steps here refuse the same files
    with the same error.
    """
    try:
        exif = header.getexif()  # also reads an XMP orientation, as exif_transpose sees it
        orientation = exif.get(_ORIENTATION_TAG, 1)
        if orientation not in _TRANSPOSING_ORIENTATIONS:
            return 1
        if "exif" in header.info:
            del exif[_ORIENTATION_TAG]
            exif.tobytes()
    except Exception as error:
        raise images.undecodable(param, error) from error
    return int(orientation)


@functools.cache
def pillow_shrinks_height_first() -> bool:
    """Whether this Pillow resamples columns first when the height shrinks more than twice as much as the width.

    Pillow 13 does (its ImagingResampleInner, to make the second pass cheaper); older ones always resample
    rows first. The order moves rounding between the passes, so ask the installed Pillow once: on this
    noise image the two orders disagree on about a quarter of the pixels.
    """
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 100), dtype=np.uint8), "L")
    direct = noise.resize((64, 192), Image.Resampling.BICUBIC)
    columns_first = noise.resize((100, 192), Image.Resampling.BICUBIC).resize((64, 192), Image.Resampling.BICUBIC)
    return np.array_equal(np.asarray(direct), np.asarray(columns_first))


class DevicePreprocessor:
    """`images.preprocess` on a torch device; thread-safe, so the pipeline's decode pool can share one.

    `preprocess` has images.preprocess's signature; calling the object uses the transform and pixel limit it
    was built with (the pipeline's hook); `preprocess_many` decodes a list in one call (batched nvJPEG).
    `on_fallback(reason)` is called whenever an image takes the exact CPU path instead (a metric's hook).
    """

    def __init__(
        self,
        transform: ImageTransform,
        *,
        max_pixels: int,
        device: str = "cuda",
        on_fallback: Callable[[str], None] | None = None,
    ) -> None:
        try:
            # importlib, not import statements: this module is on the serving path, which never imports torch;
            # only building a DevicePreprocessor (CLIPSERVE_PREPROCESS_DEVICE=cuda) loads it.
            torch = importlib.import_module("torch")
            functional = importlib.import_module("torch.nn.functional")
            torchvision_io = importlib.import_module("torchvision.io")
        except ImportError as error:
            raise RuntimeError(
                f"preprocessing on {device!r} needs torch and torchvision ({error}); install them or use the CPU path"
            ) from error
        self._torch = torch
        self._interpolate = functional.interpolate
        self._decode_jpeg = torchvision_io.decode_jpeg
        self._rgb = torchvision_io.ImageReadMode.RGB
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"preprocessing on {device!r}: torch sees no CUDA device")
        self.transform = transform
        self.max_pixels = max_pixels
        self._on_fallback = on_fallback
        self._lock = threading.Lock()
        self._fallbacks: Counter[str] = Counter()
        self._device_decoded = 0
        self._mean_std: dict[PreprocessConfig, tuple[Tensor, Tensor]] = {}
        self._self_check()

    # --- public ------------------------------------------------------------------------------------------------

    def __call__(self, data: bytes, param: str) -> np.ndarray:
        return self.preprocess(data, self.transform, max_pixels=self.max_pixels, param=param)

    def preprocess(self, data: bytes, transform: ImageTransform, *, max_pixels: int, param: str) -> np.ndarray:
        """Bytes -> float32 [3, S, S], as `images.preprocess(data, transform, max_pixels=..., param=...)`."""
        return self._run([data], [param], transform, max_pixels)[0]

    def preprocess_many(self, blobs: Sequence[bytes], params: Sequence[str] | None = None) -> np.ndarray:
        """Several uploads -> float32 [N, 3, S, S], decoded in one call (nvJPEG's batched decode on CUDA).

        Raises the error of the first image that fails its header checks, else of the first that fails to
        decode, as the same list through `images.preprocess` would for the usual single bad image.
        """
        if params is None:
            params = [f"images[{i}]" for i in range(len(blobs))]
        if len(params) != len(blobs):
            raise ValueError(f"{len(blobs)} images but {len(params)} parameter names")
        if not blobs:
            size = self.transform.config.image_size
            return np.empty((0, 3, size, size), np.float32)
        return self._run(blobs, params, self.transform, self.max_pixels)

    @property
    def fallbacks(self) -> dict[str, int]:
        """Images that took the exact CPU path, by reason, since construction."""
        with self._lock:
            return dict(self._fallbacks)

    @property
    def device_decoded(self) -> int:
        """Images decoded on the device since construction."""
        with self._lock:
            return self._device_decoded

    # --- the path --------------------------------------------------------------------------------------------

    def _run(
        self, blobs: Sequence[bytes], params: Sequence[str], transform: ImageTransform, max_pixels: int
    ) -> np.ndarray:
        config = transform.config
        # Header checks for every image first: nothing is decoded until all sizes are known to be allowed.
        plans: list[int | str] = []  # EXIF orientation for the device path, or the reason it falls back
        for data, param in zip(blobs, params, strict=True):
            header = images.decode_image(data, max_pixels=max_pixels, param=param, load=False)
            refusal = device_refusal(header, data)
            if refusal is not None:
                plans.append(refusal)
                continue
            images.check_intermediate_size(*header.size, config, max_pixels=max_pixels, param=param)
            plans.append(exif_orientation(header, param) if config.apply_exif_orientation else 1)

        with self._torch.inference_mode():
            on_device = [i for i, plan in enumerate(plans) if isinstance(plan, int)]
            decoded = {on_device[j]: pixels for j, pixels in self._decode([blobs[i] for i in on_device]).items()}
            crops: list[Tensor | np.ndarray] = []
            for i, (data, param, plan) in enumerate(zip(blobs, params, plans, strict=True)):
                pixels = decoded.get(i)
                if pixels is None:
                    reason = plan if isinstance(plan, str) else "decoder refused"
                    self._count_fallback(reason)
                    crops.append(images.preprocess(data, transform, max_pixels=max_pixels, param=param))
                else:
                    crops.append(self._geometry(pixels, int(plan), config))
            return self._normalise(crops, config)

    def _decode(self, blobs: list[bytes]) -> dict[int, Tensor]:
        """Index -> uint8 [3, H, W] on the device, for the blobs the decoder took."""
        if not blobs:
            return {}
        encoded = [self._torch.frombuffer(bytearray(data), dtype=self._torch.uint8) for data in blobs]
        try:
            batch = self._decode_jpeg(encoded, mode=self._rgb, device=self.device)
            results = dict(enumerate(batch))
        except RuntimeError:
            # The batched decode returns nothing when any image fails: decode one by one to find which.
            results = {}
            for i, tensor in enumerate(encoded):
                try:
                    results[i] = self._decode_jpeg(tensor, mode=self._rgb, device=self.device)
                except RuntimeError:
                    continue
        with self._lock:
            self._device_decoded += len(results)
        return results

    def _geometry(self, pixels: Tensor, orientation: int, config: PreprocessConfig) -> Tensor:
        """uint8 [3, H, W] -> float32 [3, S, S] holding 8-bit values: models.preprocess.resize_and_crop's steps."""
        image = _transpose(pixels, orientation)
        size = config.image_size
        if config.resize_mode == "squash":
            return self._resize(image, size, size, config)[0]
        height, width = image.shape[-2:]
        resized_width, resized_height = _resized_size(width, height, size)
        resized = self._resize(image, resized_width, resized_height, config)
        left, top, right, bottom = _centre_crop_box(resized_width, resized_height, size)
        return resized[0, :, top:bottom, left:right]

    def _resize(self, image: Tensor, width: int, height: int, config: PreprocessConfig) -> Tensor:
        """uint8 [C, H, W] -> float32 [1, C, height, width] holding 8-bit values, as Pillow's `Image.resize`."""
        batch = image.unsqueeze(0).float()
        in_height, in_width = batch.shape[-2:]
        if config.interpolation == "nearest":
            rows = self._nearest_indices(in_height, height)
            return batch.index_select(-2, rows).index_select(-1, self._nearest_indices(in_width, width))
        # Pillow resamples one axis, rounds to 8 bits (clipping the cubic's overshoot), then the other; a single
        # 2-D torch pass skips that rounding and differs by up to 18 levels on upscales, these passes by 1.
        mode = config.interpolation
        passes = [(in_height, width), (height, width)]
        if pillow_shrinks_height_first() and in_height - height > 0 and in_height - height > (in_width - width) * 2:
            passes = [(height, in_width), (height, width)]
        for size in passes:
            if tuple(batch.shape[-2:]) != size:
                batch = self._interpolate(batch, size=size, mode=mode, antialias=True).round_().clamp_(0, 255)
        return batch

    def _nearest_indices(self, size_in: int, size_out: int) -> Tensor:
        # Pillow's nearest resize (ImagingScaleAffine) walks the source by adding in/out to a double once per
        # output pixel; the same running sum in float64 picks the same pixels where torch's nearest-exact,
        # computing each position afresh, lands on the other side of an exact boundary.
        step = size_in / size_out
        positions = np.cumsum(np.concatenate([[step * 0.5], np.full(size_out - 1, step)]))
        indices = np.clip(positions.astype(np.int64), 0, size_in - 1)
        return self._torch.from_numpy(indices).to(self.device)

    def _normalise(self, crops: list[Tensor | np.ndarray], config: PreprocessConfig) -> np.ndarray:
        """8-bit-valued crops and CPU-path results -> one float32 [N, 3, S, S] host array."""
        out = np.empty((len(crops), 3, config.image_size, config.image_size), np.float32)
        device_rows = [i for i, crop in enumerate(crops) if not isinstance(crop, np.ndarray)]
        if device_rows:
            mean, std = self._mean_std_for(config)
            stacked = self._torch.stack([crops[i] for i in device_rows])  # type: ignore[misc]
            # As ImageTransform.normalise: scale to [0, 1] first, then (x - mean) / std, all in float32.
            normalised = (stacked / 255.0 - mean) / std
            out[device_rows] = normalised.cpu().numpy()
        for i, crop in enumerate(crops):
            if isinstance(crop, np.ndarray):
                out[i] = crop
        return out

    def _mean_std_for(self, config: PreprocessConfig) -> tuple[Tensor, Tensor]:
        cached = self._mean_std.get(config)
        if cached is None:
            as_tensor = functools.partial(self._torch.tensor, dtype=self._torch.float32, device=self.device)
            mean, std = as_tensor(config.mean).reshape(3, 1, 1), as_tensor(config.std).reshape(3, 1, 1)
            cached = self._mean_std[config] = (mean, std)
        return cached

    def _count_fallback(self, reason: str) -> None:
        with self._lock:
            first = reason not in self._fallbacks
            self._fallbacks[reason] += 1
        if first:
            log.info("preprocessing on %s: first image taking the CPU path (%s)", self.device, reason)
        if self._on_fallback is not None:
            self._on_fallback(reason)

    def _self_check(self) -> None:
        """Decode one tiny JPEG at start-up: a torchvision without nvJPEG fails here, not on every request,
        and nvJPEG's one-time initialisation is not paid by the first request."""
        pillow_shrinks_height_first()
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 40, 90)).save(buffer, "JPEG")
        encoded = self._torch.frombuffer(bytearray(buffer.getvalue()), dtype=self._torch.uint8)
        try:
            decoded = self._decode_jpeg(encoded, mode=self._rgb, device=self.device)
        except RuntimeError as error:
            raise RuntimeError(f"torchvision cannot decode JPEGs on {self.device}: {error}") from error
        if tuple(decoded.shape) != (3, 16, 16):
            raise RuntimeError(f"torchvision decoded a 16x16 JPEG on {self.device} as {tuple(decoded.shape)}")


def _transpose(pixels: Tensor, orientation: int) -> Tensor:
    """ImageOps.exif_transpose's transposition of a [C, H, W] tensor (Pillow's names in the comments)."""
    match orientation:
        case 2:  # FLIP_LEFT_RIGHT
            return pixels.flip(-1)
        case 3:  # ROTATE_180
            return pixels.flip(-2, -1)
        case 4:  # FLIP_TOP_BOTTOM
            return pixels.flip(-2)
        case 5:  # TRANSPOSE
            return pixels.transpose(-2, -1)
        case 6:  # ROTATE_270 (clockwise)
            return pixels.transpose(-2, -1).flip(-1)
        case 7:  # TRANSVERSE
            return pixels.transpose(-2, -1).flip(-2, -1)
        case 8:  # ROTATE_90 (counter-clockwise)
            return pixels.transpose(-2, -1).flip(-2)
    return pixels


def make_preprocessor(
    device: str,
    transform: ImageTransform,
    max_pixels: int,
    *,
    on_fallback: Callable[[str], None] | None = None,
) -> Preprocess:
    """`(data, param) -> float32 [3, S, S]`: the exact CPU path for "cpu", a DevicePreprocessor for "cuda[:N]"."""
    if device == "cpu":

        def exact(data: bytes, param: str) -> np.ndarray:
            return images.preprocess(data, transform, max_pixels=max_pixels, param=param)

        return exact
    if device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ValueError(f"preprocessing device must be 'cpu', 'cuda' or 'cuda:N', not {device!r}")
    return DevicePreprocessor(transform, max_pixels=max_pixels, device=device, on_fallback=on_fallback)
