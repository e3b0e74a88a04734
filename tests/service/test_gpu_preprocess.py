"""Device preprocessing (service.gpu.preprocess) against the exact CPU path (service.images.preprocess).

Nothing is faked. The default run executes the real device code on device="cpu" (torchvision's libjpeg-turbo
decode and the same torch resize, crop and normalise ops the GPU runs), with real onnxruntime embeddings of
the demo model. The `gpu` tests run the same code on CUDA, where nvJPEG decodes; they skip without a CUDA
device and run in `make gpu-check`.
"""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loadtests.preprocess_parity import demo_embedder, encode, levels, synthetic_photo
from models.preprocess import ImageTransform, PreprocessConfig
from service import images
from service.errors import InvalidInput, PayloadTooLarge, ServiceError, UnsupportedMediaType
from service.gpu.preprocess import DevicePreprocessor, make_preprocessor

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec (docs/gpu-preprocessing.md); the GPU
# machine's 0.26 does not warn, and the serving process hides DeprecationWarning by default.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

DATA = Path(__file__).parent / "data"
MAX_PIXELS = 1_000_000
ORIENTATION = 0x0112
SIZES = [(640, 480), (1920, 1080), (480, 640), (50, 30), (100, 300)]
CONFIGS = {
    "64 bicubic": PreprocessConfig(image_size=64),
    "224 bicubic": PreprocessConfig(image_size=224),
    "224 bilinear": PreprocessConfig(image_size=224, interpolation="bilinear"),
    "224 nearest": PreprocessConfig(image_size=224, interpolation="nearest"),
    "224 squash": PreprocessConfig(image_size=224, resize_mode="squash"),
}
# Pillow resizes with 22-bit fixed-point weights, torch in float: a value can land one level apart, rarely
# two on upscales. Decoding is the same libjpeg-turbo on the CPU, so nothing else differs there.
CPU_DEVICE_MAX_LEVELS = 2.0
# nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's. First bounds, from the error budget of a
# JPEG decoder (a few levels) after an antialiased downscale; replace with gpu-check's measured numbers.
CUDA_MAX_LEVELS = 16.0
CUDA_MEAN_LEVELS = 1.0


def _cuda_available() -> bool:
    return bool(torch.cuda.is_available())


requires_cuda = pytest.mark.skipif(
    not _cuda_available(), reason="needs a CUDA device (torch.cuda.is_available() is False); run by make gpu-check"
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    # torch's intra-op pool on a small shared machine turns every small op into a scheduler wait (10x
    # slower); one thread is also what each decode-pool worker would use.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo_transform() -> ImageTransform:
    config, _ = demo_embedder()
    return ImageTransform(config)


@pytest.fixture(scope="module")
def on_cpu(demo_transform: ImageTransform) -> DevicePreprocessor:
    return DevicePreprocessor(demo_transform, max_pixels=MAX_PIXELS, device="cpu")


def exact(data: bytes, transform: ImageTransform, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    return images.preprocess(data, transform, max_pixels=max_pixels, param="image")


def level_difference(a: np.ndarray, b: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    return np.abs(levels(a, config) - levels(b, config))


def with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return encode(image, exif=exif.tobytes())


def header_only_jpeg(width: int, height: int) -> bytes:
    """A JPEG whose frame header claims width x height, cut off right after the scan header: decoding it
    fails, so an answer about its size proves the size was read from the header alone."""
    data = bytearray(encode(synthetic_photo(32, 32, 0)))
    frame = data.find(b"\xff\xc0")
    data[frame + 5 : frame + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data[: data.find(b"\xff\xda") + 14])


def broken_huffman_table(data: bytes) -> bytes:
    """Still ends with the end-of-image marker, so it reaches the decoder, which refuses it."""
    broken = bytearray(data)
    table = broken.find(b"\xff\xc4")
    broken[table + 5 : table + 21] = b"\xff" * 16
    return bytes(broken)


def other_format(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buffer, fmt)
    return buffer.getvalue()


BAD_INPUTS: dict[str, Callable[[], bytes]] = {
    "empty": lambda: b"",
    "random bytes": lambda: np.random.default_rng(1).bytes(500),
    "truncated JPEG": lambda: encode(synthetic_photo(64, 48, 0))[:400],
    "JPEG cut after its headers": lambda: header_only_jpeg(32, 32),
    "broken Huffman table": lambda: broken_huffman_table(encode(synthetic_photo(64, 48, 0))),
    "corrupt EXIF": lambda: (DATA / "corrupt_exif.jpg").read_bytes(),
    "unsupported format (ICO)": lambda: other_format("ICO"),
    "too many pixels (header)": lambda: header_only_jpeg(2000, 1000),
    "aspect ratio too extreme": lambda: encode(Image.new("RGB", (2, 3000))),
    "far too many pixels (Pillow's bomb limit)": lambda: header_only_jpeg(60000, 60000),
}


def error_of(call: Callable[[], object]) -> tuple[type, str, str | None]:
    with pytest.raises(ServiceError) as caught:
        call()
    return type(caught.value), caught.value.message, caught.value.param


# --- parity on device="cpu" -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_photos_match_the_cpu_path_within_a_level(name: str, size: tuple[int, int]) -> None:
    transform = ImageTransform(CONFIGS[name])
    device_path = DevicePreprocessor(transform, max_pixels=MAX_PIXELS * 4, device="cpu")
    data = encode(synthetic_photo(*size, seed=size[0]))
    reference = exact(data, transform, MAX_PIXELS * 4)
    result = device_path(data, "image")
    assert result.shape == reference.shape == (3, transform.config.image_size, transform.config.image_size)
    assert result.dtype == np.float32
    difference = level_difference(reference, result, transform.config)
    assert difference.max() <= CPU_DEVICE_MAX_LEVELS
    assert np.mean(difference > 0.5) < 0.02  # measured: under 1.5 % (bilinear), 0.02 % (bicubic)
    if transform.config.interpolation == "nearest":
        np.testing.assert_array_equal(result, reference)  # same source pixels picked: exact
    assert device_path.device_decoded == 1 and device_path.fallbacks == {}


def test_probe_embeddings_match_the_cpu_path(on_cpu: DevicePreprocessor, demo_transform: ImageTransform) -> None:
    pytest.importorskip("onnxruntime")
    from export.probes import probe_images

    _, embed = demo_embedder()
    assert embed is not None
    blobs = [encode(image) for image in probe_images(32)]
    reference = np.stack([exact(b, demo_transform) for b in blobs])
    result = on_cpu.preprocess_many(blobs)
    cosines = np.sum(embed(reference) * embed(result), axis=1)
    # Differences of at most a level in a few values in 10,000 move the demo embeddings by less than 1e-5.
    assert cosines.min() >= 0.9999
    assert level_difference(reference, result, demo_transform.config).max() <= CPU_DEVICE_MAX_LEVELS


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pillow_does(
    on_cpu: DevicePreprocessor, demo_transform: ImageTransform, orientation: int
) -> None:
    # Landscape, with distinct corners: any wrong flip or rotation moves whole regions, far past a level.
    data = with_orientation(synthetic_photo(320, 200, orientation), orientation)
    reference = exact(data, demo_transform)
    difference = level_difference(reference, on_cpu(data, "image"), demo_transform.config)
    assert difference.max() <= CPU_DEVICE_MAX_LEVELS


@pytest.mark.parametrize(
    "make",
    [
        lambda image: encode(image, xmp=b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><tiff:Orientation>6</tiff:Orientation>'),
        lambda image: with_orientation(image, 9),  # out of range: exif_transpose leaves the image as it is
        lambda image: with_orientation(image, 0),
    ],
    ids=["xmp-orientation", "orientation-9", "orientation-0"],
)
def test_orientation_edge_cases_follow_exif_transpose(
    on_cpu: DevicePreprocessor, demo_transform: ImageTransform, make: Callable[[Image.Image], bytes]
) -> None:
    data = make(synthetic_photo(320, 200, 99))
    difference = level_difference(exact(data, demo_transform), on_cpu(data, "image"), demo_transform.config)
    assert difference.max() <= CPU_DEVICE_MAX_LEVELS


def test_grayscale_jpeg_becomes_three_equal_channels(
    on_cpu: DevicePreprocessor, demo_transform: ImageTransform
) -> None:
    data = encode(synthetic_photo(640, 480, 7).convert("L"))
    decoded_before = on_cpu.device_decoded
    result = on_cpu(data, "image")
    assert on_cpu.device_decoded == decoded_before + 1  # decoded on the device, not a fallback
    pixels = levels(result, demo_transform.config)
    np.testing.assert_allclose(pixels[0], pixels[1], atol=1e-3)
    np.testing.assert_allclose(pixels[1], pixels[2], atol=1e-3)
    assert level_difference(exact(data, demo_transform), result, demo_transform.config).max() <= CPU_DEVICE_MAX_LEVELS


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: encode(synthetic_photo(200, 150, 1), "PNG"), "format PNG"),
        (lambda: encode(synthetic_photo(200, 150, 2), "WEBP", lossless=True), "format WEBP"),
        (lambda: encode(synthetic_photo(200, 150, 3).convert("CMYK")), "JPEG mode CMYK"),
        (lambda: encode(synthetic_photo(200, 150, 4))[:-2], "no JPEG end marker"),
        (lambda: encode(synthetic_photo(200, 150, 5)) + b"trailer", "no JPEG end marker"),
    ],
    ids=["png", "webp", "cmyk-jpeg", "jpeg-without-end-marker", "jpeg-with-trailer"],
)
def test_what_the_device_does_not_take_goes_through_the_exact_cpu_path(
    demo_transform: ImageTransform, make: Callable[[], bytes], reason: str
) -> None:
    reasons: list[str] = []
    device_path = DevicePreprocessor(demo_transform, max_pixels=MAX_PIXELS, device="cpu", on_fallback=reasons.append)
    data = make()
    try:
        reference = exact(data, demo_transform)
    except InvalidInput:  # the JPEG without its end marker is truncated: the CPU path's error is the answer
        assert error_of(lambda: device_path(data, "image")) == error_of(lambda: exact(data, demo_transform))
    else:
        np.testing.assert_array_equal(device_path(data, "image"), reference)
    assert device_path.fallbacks == {reason: 1}
    assert reasons == [reason]
    assert device_path.device_decoded == 0


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_the_cpu_paths_error(
    on_cpu: DevicePreprocessor, demo_transform: ImageTransform, case: str
) -> None:
    data = BAD_INPUTS[case]()
    expected = error_of(lambda: images.preprocess(data, demo_transform, max_pixels=MAX_PIXELS, param="images[3]"))
    assert error_of(lambda: on_cpu(data, "images[3]")) == expected
    assert error_of(lambda: on_cpu.preprocess_many([data], ["images[3]"])) == expected


def test_too_many_pixels_is_refused_from_the_header_without_decoding(demo_transform: ImageTransform) -> None:
    device_path = DevicePreprocessor(demo_transform, max_pixels=MAX_PIXELS, device="cpu")
    kind, message, param = error_of(lambda: device_path(header_only_jpeg(2000, 1000), "images[0]"))
    assert (kind, param) == (PayloadTooLarge, "images[0]")
    assert "2000x1000 is 2,000,000 pixels; the limit is 1,000,000" in message
    assert device_path.device_decoded == 0 and device_path.fallbacks == {}


def test_no_image_is_decoded_until_every_header_passed(demo_transform: ImageTransform) -> None:
    device_path = DevicePreprocessor(demo_transform, max_pixels=MAX_PIXELS, device="cpu")
    good = encode(synthetic_photo(64, 48, 0))
    kind, _, param = error_of(lambda: device_path.preprocess_many([good, other_format("ICO"), good]))
    assert (kind, param) == (UnsupportedMediaType, "images[1]")
    assert device_path.device_decoded == 0


def test_preprocess_many_equals_one_by_one(on_cpu: DevicePreprocessor, demo_transform: ImageTransform) -> None:
    blobs = [
        encode(synthetic_photo(640, 480, 11)),
        encode(synthetic_photo(300, 200, 12), "PNG"),
        with_orientation(synthetic_photo(320, 240, 13), 6),
        encode(synthetic_photo(200, 100, 14).convert("L")),
        encode(synthetic_photo(120, 90, 15).convert("CMYK")),
    ]
    batch = on_cpu.preprocess_many(blobs)
    assert batch.shape == (len(blobs), 3, 64, 64) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch, np.stack([on_cpu(b, "image") for b in blobs]))
    assert on_cpu.preprocess_many([]).shape == (0, 3, 64, 64)


def test_a_decoder_refusal_in_a_batch_falls_back_for_that_image_only(demo_transform: ImageTransform) -> None:
    device_path = DevicePreprocessor(demo_transform, max_pixels=MAX_PIXELS, device="cpu")
    good = encode(synthetic_photo(640, 480, 21))
    refused = broken_huffman_table(encode(synthetic_photo(64, 48, 22)))
    kind, _, param = error_of(lambda: device_path.preprocess_many([good, refused]))
    assert (kind, param) == (InvalidInput, "images[1]")  # Pillow's error for it, from the CPU path
    assert device_path.fallbacks == {"decoder refused": 1}
    assert device_path.device_decoded == 1  # the good one, decoded alone after the batch failed


def test_concurrent_calls_from_decode_pool_threads(on_cpu: DevicePreprocessor) -> None:
    blobs = [encode(synthetic_photo(320, 240, 30 + i)) for i in range(8)]
    expected = [on_cpu(b, "image") for b in blobs]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda b: on_cpu(b, "image"), blobs * 3))
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result, expected[i % len(blobs)])


# --- the factory and the torch-free import -----------------------------------------------------------------------


def test_make_preprocessor_cpu_is_the_exact_path(demo_transform: ImageTransform) -> None:
    preprocess = make_preprocessor("cpu", demo_transform, MAX_PIXELS)
    data = encode(synthetic_photo(640, 480, 40))
    np.testing.assert_array_equal(preprocess(data, "image"), exact(data, demo_transform))
    assert error_of(lambda: preprocess(b"", "images[2]")) == (InvalidInput, "images[2]: empty image", "images[2]")


def test_make_preprocessor_refuses_unknown_devices(demo_transform: ImageTransform) -> None:
    for device in ("gpu", "cuda:x", "tpu", ""):
        with pytest.raises(ValueError, match="'cpu', 'cuda' or 'cuda:N'"):
            make_preprocessor(device, demo_transform, MAX_PIXELS)


@pytest.mark.skipif(_cuda_available(), reason="checks the error on a machine without CUDA")
def test_make_preprocessor_cuda_without_a_gpu_says_so(demo_transform: ImageTransform) -> None:
    with pytest.raises(RuntimeError, match="no CUDA device"):
        make_preprocessor("cuda", demo_transform, MAX_PIXELS)


def test_the_module_imports_without_torch() -> None:
    code = "; ".join(
        [
            "import sys",
            *[f"sys.modules[{name!r}] = None" for name in ("torch", "torchvision")],
            "from service.gpu.preprocess import make_preprocessor",
            "from models.preprocess import ImageTransform, PreprocessConfig",
            "p = make_preprocessor('cpu', ImageTransform(PreprocessConfig(image_size=32)), 10**6)",
            "print('ok')",
        ]
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# --- on CUDA (nvJPEG) ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def on_cuda(demo_transform: ImageTransform) -> DevicePreprocessor:
    return DevicePreprocessor(demo_transform, max_pixels=MAX_PIXELS * 4, device="cuda")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("subsampling", [0, 2], ids=["4:4:4", "4:2:0"])
def test_cuda_photos_are_close_to_the_cpu_path(
    on_cuda: DevicePreprocessor, demo_transform: ImageTransform, size: tuple[int, int], subsampling: int
) -> None:
    data = encode(synthetic_photo(*size, seed=size[1]), subsampling=subsampling)
    result = on_cuda(data, "image")
    difference = level_difference(exact(data, demo_transform, MAX_PIXELS * 4), result, demo_transform.config)
    assert result.shape == (3, 64, 64) and result.dtype == np.float32
    assert difference.max() <= CUDA_MAX_LEVELS and difference.mean() <= CUDA_MEAN_LEVELS


@pytest.mark.gpu
@requires_cuda
def test_cuda_probe_embeddings_match_the_cpu_path(on_cuda: DevicePreprocessor, demo_transform: ImageTransform) -> None:
    pytest.importorskip("onnxruntime", reason="the embedding check runs the demo model on onnxruntime")
    _, embed = demo_embedder()
    assert embed is not None
    from loadtests.preprocess_parity import probe_images

    _, probes = probe_images(32)
    blobs = [encode(image) for image in probes]
    reference = np.stack([exact(b, demo_transform) for b in blobs])
    cosines = np.sum(embed(reference) * embed(on_cuda.preprocess_many(blobs)), axis=1)
    assert cosines.min() >= 0.999


@pytest.mark.gpu
@requires_cuda
def test_cuda_batched_decode_equals_one_by_one_and_falls_back(
    on_cuda: DevicePreprocessor, demo_transform: ImageTransform
) -> None:
    blobs = [
        encode(synthetic_photo(640, 480, 51)),
        encode(synthetic_photo(300, 200, 52), "PNG"),
        with_orientation(synthetic_photo(320, 240, 53), 6),
        encode(synthetic_photo(200, 100, 54).convert("L")),
        encode(synthetic_photo(120, 90, 55).convert("CMYK")),
        encode(synthetic_photo(640, 480, 56), progressive=True),
    ]
    decoded_before = on_cuda.device_decoded
    batch = on_cuda.preprocess_many(blobs)
    assert on_cuda.device_decoded - decoded_before >= 4  # all but PNG and CMYK (progressive may be refused)
    np.testing.assert_allclose(batch, np.stack([on_cuda(b, "image") for b in blobs]), atol=1e-5)
    np.testing.assert_array_equal(batch[1], exact(blobs[1], demo_transform))  # PNG: the exact CPU path
    np.testing.assert_array_equal(batch[4], exact(blobs[4], demo_transform))  # CMYK: the exact CPU path
    for i in (0, 2, 3, 5):
        difference = level_difference(exact(blobs[i], demo_transform), batch[i], demo_transform.config)
        assert difference.max() <= CUDA_MAX_LEVELS and difference.mean() <= CUDA_MEAN_LEVELS


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_cuda_bad_input_gets_the_cpu_paths_error(demo_transform: ImageTransform, case: str) -> None:
    device_path = DevicePreprocessor(demo_transform, max_pixels=MAX_PIXELS, device="cuda")
    data = BAD_INPUTS[case]()
    assert error_of(lambda: device_path(data, "image")) == error_of(lambda: exact(data, demo_transform))
