"""How far device preprocessing (service.gpu.preprocess) is from the exact CPU path, and how fast each is.

For each image set (the parity gate's probe images, synthetic photos of upload sizes, grayscale, EXIF-rotated,
progressive, and formats that fall back to the CPU path) and each input size (the demo model's, and 224 as
for ViT-B models), it preprocesses every image both ways and reports the largest and mean pixel difference
in 8-bit levels, the cosine between the demo model's image embeddings of the two results (ONNX Runtime on
the CPU; only at the demo model's size), how many images the device decoded, and images/s of the CPU path,
of the device path one image at a time, and of `preprocess_many` in batches.

    python -m loadtests.preprocess_parity --device cpu --out /tmp/parity.md     # torchvision's CPU decode
    python -m loadtests.preprocess_parity --device cuda --out $OUT/parity.md    # nvJPEG (gpu-check)

`measure(device, ...)` and `markdown_table(rows)` are what the GPU check imports.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from loadtests.timing import rate_per_second
from models.demo import shapes
from models.demo.config import EXPORT_NAME, REPOSITORY_DIR
from models.preprocess import ImageTransform, PreprocessConfig
from service import images
from service.gpu.preprocess import DevicePreprocessor

MAX_PIXELS = 40_000_000  # the service's default CLIPSERVE_MAX_IMAGE_PIXELS
ORIENTATION = 0x0112


@dataclass(frozen=True)
class ImageSet:
    name: str
    blobs: list[bytes]


def synthetic_photo(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like RGB image: smooth colour fields, sharp-edged objects, fine texture and sensor noise.

    Sharp colour edges are where JPEG decoders differ most (chroma upsampling), smooth areas are where a
    resize's rounding shows; a flat rendered shape has too little of either.
    """
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 256, (max(height // 96, 2), max(width // 96, 2), 3), dtype=np.uint8)
    image = Image.fromarray(grid, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, x1 = sorted(rng.integers(0, width, 2).tolist())
        y0, y1 = sorted(rng.integers(0, height, 2).tolist())
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1 + 1, y1 + 1), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(0.8))  # optics: edges a pixel wide, not aliased steps
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str = "JPEG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        options.setdefault("quality", 90)
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def probe_images(count: int) -> tuple[str, list[Image.Image]]:
    """The parity gate's probe images; rendered demo scenes where export's dependencies are missing."""
    try:
        from export.probes import probe_images as export_probes  # needs torch and onnxruntime
    except ImportError:
        rng = np.random.default_rng(20_261_129)
        scenes = [
            shapes.render(rng, *shapes.random_composition(rng, shapes.ALL_COMPOSITIONS), min_side=24, max_side=640)
            for _ in range(count)
        ]
        return "rendered demo scenes", [scene.image for scene in scenes]
    return "probe images", export_probes(count)


def image_sets(photos: int, probes: int) -> list[ImageSet]:
    probe_name, probe_list = probe_images(probes)
    rotated = []
    for i in range(photos):
        exif = Image.Exif()
        exif[ORIENTATION] = 6  # a phone held upright: stored landscape, shown portrait
        rotated.append(encode(synthetic_photo(640, 480, 300 + i), exif=exif.tobytes()))
    return [
        ImageSet(f"{probe_name}, JPEG q90", [encode(image) for image in probe_list]),
        ImageSet("photo 640×480 JPEG q90", [encode(synthetic_photo(640, 480, i)) for i in range(photos)]),
        ImageSet("photo 1920×1080 JPEG q90", [encode(synthetic_photo(1920, 1080, 100 + i)) for i in range(photos)]),
        ImageSet(
            "photo 640×480 JPEG q90 4:4:4",
            [encode(synthetic_photo(640, 480, 200 + i), subsampling=0) for i in range(photos)],
        ),
        ImageSet("photo 640×480 EXIF-rotated (6)", rotated),
        ImageSet(
            "photo 640×480 grayscale JPEG",
            [encode(synthetic_photo(640, 480, 400 + i).convert("L")) for i in range(photos)],
        ),
        ImageSet(
            "photo 640×480 progressive JPEG",
            [encode(synthetic_photo(640, 480, 500 + i), progressive=True) for i in range(photos)],
        ),
        ImageSet(f"{probe_name}, PNG (CPU fallback)", [encode(image, "PNG") for image in probe_list[: max(photos, 1)]]),
        ImageSet(
            "photo 640×480 CMYK JPEG (CPU fallback)",
            [encode(synthetic_photo(640, 480, 600 + i).convert("CMYK")) for i in range(photos)],
        ),
    ]


def images_per_second(run: Callable[[], object], count: int, seconds: float) -> float:
    # One warm-up call: first-call allocations, nvJPEG's buffers, torch's kernels.
    return rate_per_second(run, count, warmup=1, reps=1, seconds=seconds)


def levels(pixels: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Normalised float32 [..., 3, S, S] back to 8-bit levels, where one level is the unit a decoder errs by."""
    mean = np.asarray(config.mean, np.float64).reshape(3, 1, 1)
    std = np.asarray(config.std, np.float64).reshape(3, 1, 1)
    return (pixels.astype(np.float64) * std + mean) * 255.0


def demo_embedder() -> tuple[PreprocessConfig, Callable[[np.ndarray], np.ndarray] | None]:
    """The demo model's preprocessing, and its image encoder (None without onnxruntime).

    Reads manifest.json as plain JSON: the GPU machine may lack pydantic, which models.manifest needs.
    """
    directory = REPOSITORY_DIR / EXPORT_NAME
    manifest = json.loads((directory / "manifest.json").read_text())
    config = PreprocessConfig.from_dict(manifest["preprocess"])
    try:
        import onnxruntime as ort
    except ImportError:
        return config, None
    session = ort.InferenceSession(str(directory / "image.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def embed(pixels: np.ndarray) -> np.ndarray:
        vectors = np.asarray(session.run(None, {name: np.ascontiguousarray(pixels, np.float32)})[0], np.float64)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    return config, embed


def measure(
    device: str,
    *,
    photos: int = 16,
    probes: int = 64,
    sizes: Sequence[int] = (0, 224),
    batch: int = 64,
    seconds: float = 1.0,
    cpu_threads: int = 1,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per (image set, input size); size 0 means the demo model's own (embedding cosines only there).

    On device "cpu" torch runs `cpu_threads` intra-op threads: one matches one decode-pool worker, and torch's
    thread pool on a small, busy machine turns its many small ops into scheduler waits (40 ms an image
    instead of 3 on two shared cores). `on_row` gets each row as it is finished (a caller with a time limit keeps
    the rows done before it).
    """
    if device == "cpu":
        import torch

        torch.set_num_threads(cpu_threads)
    demo_config, embed = demo_embedder()
    sets = image_sets(photos, probes)
    rows: list[dict[str, Any]] = []
    for size in sizes:
        config = demo_config if size == 0 else PreprocessConfig(image_size=size)
        transform = ImageTransform(config)
        device_path = DevicePreprocessor(transform, max_pixels=MAX_PIXELS, device=device)
        for image_set in sets:
            blobs = image_set.blobs
            params = [f"images[{i}]" for i in range(len(blobs))]

            def cpu_path(blobs: list[bytes] = blobs, transform: ImageTransform = transform) -> np.ndarray:
                return np.stack([images.preprocess(b, transform, max_pixels=MAX_PIXELS, param="image") for b in blobs])

            def one_by_one(blobs: list[bytes] = blobs, dp: DevicePreprocessor = device_path) -> np.ndarray:
                return np.stack([dp(b, "image") for b in blobs])

            def batched(blobs: list[bytes] = blobs, dp: DevicePreprocessor = device_path) -> list[np.ndarray]:
                return [dp.preprocess_many(blobs[i : i + batch]) for i in range(0, len(blobs), batch)]

            decoded_before, fallbacks_before = device_path.device_decoded, sum(device_path.fallbacks.values())
            exact = cpu_path()
            approx = device_path.preprocess_many(blobs, params)
            decoded = device_path.device_decoded - decoded_before
            fell_back = sum(device_path.fallbacks.values()) - fallbacks_before
            difference = np.abs(levels(exact, config) - levels(approx, config))
            cosines = None
            if embed is not None and config == demo_config:
                cosines = np.sum(embed(exact) * embed(approx), axis=1)
            rows.append(
                {
                    "set": image_set.name,
                    "images": len(blobs),
                    "size": config.image_size,
                    "interpolation": config.interpolation,
                    "device_decoded": decoded,
                    "fallbacks": fell_back,
                    "max_levels": float(difference.max()),
                    "mean_levels": float(difference.mean()),
                    "differing": float(np.mean(difference > 0.5)),
                    "min_cosine": None if cosines is None else float(cosines.min()),
                    "mean_cosine": None if cosines is None else float(cosines.mean()),
                    "cpu_images_s": images_per_second(cpu_path, len(blobs), seconds),
                    "device_images_s": images_per_second(one_by_one, len(blobs), seconds),
                    "device_batched_images_s": images_per_second(batched, len(blobs), seconds),
                }
            )
            if on_row is not None:
                on_row(rows[-1])
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    def cosine(row: dict[str, Any]) -> str:
        if row["min_cosine"] is None:
            return "n/a | n/a"
        return f"{row['min_cosine']:.6f} | {1.0 - row['min_cosine']:.1e}"

    lines = [
        "| image set | images | S | decoded on device / CPU fallback | max Δ (levels) | mean Δ (levels) "
        "| values differing | min cosine | max 1 − cosine | CPU path img/s | device img/s (one by one) "
        "| device img/s (batched) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['set']} | {row['images']} | {row['size']} | {row['device_decoded']} / {row['fallbacks']} "
            f"| {row['max_levels']:.2f} | {row['mean_levels']:.4f} | {row['differing']:.4%} | {cosine(row)} "
            f"| {row['cpu_images_s']:.0f} | {row['device_images_s']:.0f} | {row['device_batched_images_s']:.0f} |"
        )
    return "\n".join(lines)


def environment(device: str) -> str:
    import PIL
    import torch
    import torchvision

    where = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else platform.processor()
    return (
        f"device `{device}` ({where or platform.machine()}); torch {torch.__version__} ({torch.get_num_threads()} "
        f"intra-op threads), torchvision {torchvision.__version__}, Pillow {PIL.__version__}, Python "
        f"{platform.python_version()}; the CPU path runs on one thread, as in one decode-pool worker"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="torch device of the device path: cuda, cuda:N or cpu")
    parser.add_argument("--photos", type=int, default=16, help="synthetic photos per set")
    parser.add_argument("--probes", type=int, default=64, help="probe images")
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 224], help="input sizes; 0: the demo model's")
    parser.add_argument("--batch", type=int, default=64, help="images per preprocess_many call")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per speed measurement")
    parser.add_argument("--cpu-threads", type=int, default=1, help="torch intra-op threads with --device cpu")
    parser.add_argument("--out", type=Path, help="also write the report (Markdown) here")
    args = parser.parse_args(argv)

    rows = measure(
        args.device,
        photos=args.photos,
        probes=args.probes,
        sizes=args.sizes,
        batch=args.batch,
        seconds=args.seconds,
        cpu_threads=args.cpu_threads,
    )
    report = "\n\n".join(
        [
            f"## Device preprocessing against the exact CPU path ({args.device})",
            environment(args.device),
            markdown_table(rows),
            "Δ: |device − CPU path| in 8-bit levels after undoing mean/std. Cosine: the demo model's image "
            "embeddings of the two results (ONNX Runtime, CPU), at the demo model's input size only.",
        ]
    )
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
