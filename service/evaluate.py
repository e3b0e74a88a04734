"""`clipserve eval`: zero-shot accuracy of a model on a labelled image folder, through the engine or over HTTP.

The folder holds one sub-folder of images per class (jpg, jpeg, png, webp, bmp, gif); a class is named after its
folder ("_" read as a space) unless a class map renames it. Every prompt setting turns into per-image
probabilities over the class list [N, C], and everything after that (top-1, top-5, per-class accuracy, the
confusion matrix, the JSON, the Markdown and the PNG) is shared, so the two backends can only differ in how they
get those probabilities:

- `EngineBackend` runs the model in this process exactly as the service does: `ServedModel.load` and the
  service's engine factory (so the CLIPSERVE_* engine settings apply), `service.images.preprocess` for the bytes,
  label vectors by `models.templates.ensemble` of the text engine's prompt embeddings, and `models.scoring` for
  the probabilities. Images are embedded once and scored against every setting's label matrix.
- `HttpBackend` posts the same images to a running service's `POST /classify` with the labels and templates
  inline (or a saved classifier's name) and every label in the answer (`top_k`), in batches no larger than the
  server's own `images` limit (read from its OpenAPI schema). Standard library only, like `upload-examples`.

Without `--templates` the command repeats the paper's prompt-engineering comparison: the bare label, "a photo
of a {}." and the 80-template ensemble; the ensemble is then the main setting (per-class table, confusion
matrix). With `--templates` (repeatable: a preset name or a file of one template per line) the first one is the
main setting. `--classifier` scores a saved classifier, which only a running service holds, so it needs `--url`;
its labels must include every class, and only the classes' columns are ranked (extra labels are ignored).

Ties rank in class order (`models.scoring.ranked`), on both backends, so equal probabilities give equal answers.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from models.scoring import cosines, ranked
from models.templates import PRESETS, TemplateError, apply_templates, ensemble, validate_templates

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
DEFAULT_SETTINGS = ("bare", "photo", "imagenet")  # the paper's comparison, main setting last
_DESCRIPTIONS = {
    "bare": "bare label",
    "photo": '"a photo of a {}."',
    "imagenet": "80-template ensemble",
    "simple": "7-template ensemble",
}
_HTTP_BATCH_BYTES = 12 * 1024 * 1024  # base64 makes it 16 MB, under the service's default 20 MB body limit
_FALLBACK_HTTP_BATCH = 8

Progress = Callable[[int], None]


class EvaluationError(RuntimeError):
    """The evaluation cannot run (bad folder, model, template file or server answer); the message says why."""


# --- the folder ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    root: Path
    classes: list[str]  # display names, the labels the model sees
    folders: list[str]
    images: list[Path]
    truth: np.ndarray  # [N] class index per image
    skipped: list[Path] = field(default_factory=list)  # files with an image suffix that do not open as images

    def counts(self) -> list[int]:
        return np.bincount(self.truth, minlength=len(self.classes)).tolist()


def read_class_map(path: Path) -> dict[str, str]:
    """folder -> class name, from a JSON object or "folder<TAB>name" lines."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("{"):
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as error:
            raise EvaluationError(f"{path}: not valid JSON ({error})") from None
        if not all(isinstance(v, str) for v in mapping.values()):
            raise EvaluationError(f"{path}: every class name must be a string")
        return dict(mapping)
    mapping = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        folder, tab, name = line.partition("\t")
        if not tab or not name.strip():
            raise EvaluationError(f"{path}:{number}: expected 'folder<TAB>class name'")
        mapping[folder.strip()] = name.strip()
    return mapping


def load_folder(root: Path, class_map: dict[str, str] | None = None, limit_per_class: int | None = None) -> Dataset:
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise EvaluationError(f"{root} has no sub-folders (one per class expected)")
    if class_map is not None:
        unknown = [f for f in folders if f not in class_map]
        if unknown:
            raise EvaluationError(f"the class map names no class for folder(s): {', '.join(unknown)}")
    classes = [class_map[f] if class_map is not None else f.replace("_", " ") for f in folders]
    duplicates = sorted({c for c in classes if classes.count(c) > 1})
    if duplicates:
        raise EvaluationError(f"several folders give the same class name: {', '.join(duplicates)}")
    images: list[Path] = []
    truth: list[int] = []
    skipped: list[Path] = []
    for index, folder in enumerate(folders):
        files = sorted(p for p in (root / folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        opens = {p: _opens(p) for p in files}
        skipped += [p for p in files if not opens[p]]
        readable = [p for p in files if opens[p]][:limit_per_class]
        images += readable
        truth += [index] * len(readable)
    if not images:
        raise EvaluationError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the sub-folders of {root}")
    return Dataset(root, classes, folders, images, np.asarray(truth, dtype=np.int64), skipped)


def _opens(path: Path) -> bool:
    # A real folder has the odd truncated download or mislabelled file: it is left out and listed, rather than
    # stopping the run (the engine would fail on it, and over HTTP it would take its whole batch down with a 422).
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception:
        return False
    return True


# --- prompt settings -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSetting:
    name: str  # the JSON key: a preset name, a template file's stem, or "classifier:NAME"
    description: str
    templates: tuple[str, ...] = ()
    preset: str | None = None  # sent by name over HTTP
    classifier: str | None = None


def prompt_settings(templates: Sequence[str], classifier: str | None) -> list[PromptSetting]:
    """The settings to score, the main one first."""
    if classifier is not None:
        if templates:
            raise EvaluationError("--classifier and --templates exclude each other (a classifier has its own)")
        return [PromptSetting(f"classifier:{classifier}", f"saved classifier {classifier!r}", classifier=classifier)]
    if not templates:
        return [_preset(name) for name in reversed(DEFAULT_SETTINGS)]
    settings = [_preset(value) if value in PRESETS else _template_file(Path(value)) for value in templates]
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise EvaluationError(f"the same prompt setting is named twice: {', '.join(names)}")
    return settings


def _preset(name: str) -> PromptSetting:
    description = _DESCRIPTIONS.get(name, f"preset {name!r}")
    return PromptSetting(name, description, PRESETS[name], preset=name)


def _template_file(path: Path) -> PromptSetting:
    if not path.is_file():
        raise EvaluationError(f"--templates {path}: neither a preset ({', '.join(PRESETS)}) nor a file")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    try:
        templates = validate_templates([line for line in lines if line])
    except TemplateError as error:
        raise EvaluationError(f"{path}: {error}") from None
    return PromptSetting(path.stem, f"{len(templates)} templates from {path.name}", templates)


# --- backends ------------------------------------------------------------------------------------------------


class Backend(Protocol):
    model: str  # the model's name, as the service reports it
    source: str  # where it ran: a model directory or a URL

    def work(self, images: int, settings: int) -> int:
        """Progress units the run will report (images embedded or sent)."""
        ...

    def probabilities(
        self, dataset: Dataset, settings: Sequence[PromptSetting], progress: Progress
    ) -> dict[str, np.ndarray]:
        """setting name -> [N, C] probabilities over `dataset.classes`."""
        ...

    def close(self) -> None: ...


class EngineBackend:
    def __init__(self, repository: Path | None = None, model: str | None = None) -> None:
        from pydantic import ValidationError

        from service.engines.factory import build_engines
        from service.model import ServedModel
        from service.settings import Settings

        overrides = {"model_repository": repository, "model": model}
        try:
            # The rest (engine, precision, threads, pixel limit) from CLIPSERVE_*, as the service reads it.
            self.settings = Settings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
        except ValidationError as error:
            raise EvaluationError(f"invalid CLIPSERVE_* settings: {error}") from None
        try:
            self.served = ServedModel.load(self.settings)
            self.engines = build_engines(self.settings, self.served.manifest, self.served.directory)
        except (OSError, ValueError, RuntimeError) as error:  # no model, bad manifest, EngineError
            raise EvaluationError(str(error)) from None
        self.model, self.source = self.served.name, str(self.served.directory)

    def work(self, images: int, settings: int) -> int:
        return images

    def probabilities(
        self, dataset: Dataset, settings: Sequence[PromptSetting], progress: Progress
    ) -> dict[str, np.ndarray]:
        for setting in settings:
            if setting.classifier is not None:
                raise EvaluationError(
                    "a saved classifier lives in a running service: evaluate it with --url, not the engine"
                )
        embeddings = self._embed_images(dataset.images, progress)
        return {
            setting.name: self.served.scoring.probabilities(
                cosines(embeddings, self._label_matrix(dataset.classes, setting.templates))
            )
            for setting in settings
        }

    def _embed_images(self, paths: Sequence[Path], progress: Progress) -> np.ndarray:
        from service.errors import ServiceError
        from service.images import preprocess

        step = self.engines.image.max_batch_size or self.settings.max_batch_size
        step = min(step, self.settings.max_batch_size)
        parts = []
        for start in range(0, len(paths), step):
            batch = paths[start : start + step]
            pixels = []
            for path in batch:
                try:
                    pixels.append(
                        preprocess(
                            path.read_bytes(),
                            self.served.transform,
                            max_pixels=self.settings.max_image_pixels,
                            param=str(path),
                        )
                    )
                except ServiceError as error:  # the same refusal the service would answer with
                    raise EvaluationError(str(error)) from None
            parts.append(np.asarray(self.engines.image(np.stack(pixels)), dtype=np.float32))
            progress(len(batch))
        return np.concatenate(parts)

    def _label_matrix(self, labels: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        prompts = [prompt for label in labels for prompt in apply_templates(templates, label)]
        step = min(self.engines.text.max_batch_size or self.settings.text_max_batch_size, 256)
        embeddings = [
            np.asarray(self.engines.text(self.served.tokenizer(prompts[i : i + step])), dtype=np.float32)
            for i in range(0, len(prompts), step)
        ]
        return ensemble(np.concatenate(embeddings), len(labels))

    def close(self) -> None:
        self.engines.close()


class HttpBackend:
    def __init__(self, url: str, api_key: str | None = None, batch: int | None = None) -> None:
        from service.examples_upload import Client

        self.client = Client(url, api_key)
        self.source, self.model = self.client.url, "?"
        self.batch = batch or self._server_image_limit()

    def _server_image_limit(self) -> int:
        """The server's CLIPSERVE_MAX_IMAGES, which its OpenAPI schema publishes as `images.maxItems`."""
        try:
            status, schema = self.client.request("GET", "/openapi.json")
        except OSError as error:
            raise EvaluationError(f"cannot reach {self.client.url}: {error}") from None
        if status in (401, 403):  # a service may guard its schema too: say so now, not after the first batch
            raise EvaluationError(f"{self.client.url} refused the API key: {schema.get('error', {}).get('message')}")
        try:
            body = schema["paths"]["/classify"]["post"]["requestBody"]["content"]["application/json"]["schema"]
            if "$ref" in body:
                body = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]
            return int(body["properties"]["images"]["maxItems"])
        except (KeyError, TypeError, ValueError):
            return _FALLBACK_HTTP_BATCH  # an older or proxied service: small batches always fit

    def work(self, images: int, settings: int) -> int:
        return images * settings

    def probabilities(
        self, dataset: Dataset, settings: Sequence[PromptSetting], progress: Progress
    ) -> dict[str, np.ndarray]:
        encoded = [base64.b64encode(path.read_bytes()).decode() for path in dataset.images]
        return {setting.name: self._classify(dataset, encoded, setting, progress) for setting in settings}

    def _classify(self, dataset: Dataset, encoded: list[str], setting: PromptSetting, progress: Progress) -> np.ndarray:
        body: dict[str, Any]
        if setting.classifier is not None:
            body = {"classifier": setting.classifier}  # every label back: no top_k
        else:
            body = {
                "labels": dataset.classes,
                "templates": setting.preset or list(setting.templates),
                "top_k": len(dataset.classes),
            }
        column = {label: index for index, label in enumerate(dataset.classes)}
        rows: list[np.ndarray] = []
        for batch in self._batches(encoded):
            try:
                status, answer = self.client.request(
                    "POST", "/classify", json.dumps(body | {"images": batch}).encode(), "application/json"
                )
            except OSError as error:
                raise EvaluationError(f"cannot reach {self.client.url}: {error}") from None
            if status >= 400:
                message = answer.get("error", {}).get("message", f"HTTP {status}")
                first = len(rows)
                raise EvaluationError(
                    f"{setting.description}: the service refused images {first}-{first + len(batch) - 1} "
                    f"(from {dataset.images[first]}): {message}"
                )
            self.model = answer.get("model", self.model)
            for result in answer["results"]:
                row = np.full(len(dataset.classes), np.nan)
                for score in result["labels"]:
                    if score["label"] in column:
                        row[column[score["label"]]] = score["probability"]
                if np.isnan(row).any():
                    missing = [dataset.classes[i] for i in np.flatnonzero(np.isnan(row))]
                    raise EvaluationError(f"{setting.description} has no label for class(es): {', '.join(missing)}")
                rows.append(row)
            progress(len(batch))
        return np.stack(rows)

    def _batches(self, encoded: list[str]) -> list[list[str]]:
        batches: list[list[str]] = [[]]
        size = 0
        for item in encoded:
            if batches[-1] and (len(batches[-1]) >= self.batch or size + len(item) > _HTTP_BATCH_BYTES * 4 / 3):
                batches.append([])
                size = 0
            batches[-1].append(item)
            size += len(item)
        return batches

    def close(self) -> None:
        pass


# --- metrics -------------------------------------------------------------------------------------------------


@dataclass
class SettingResult:
    setting: PromptSetting
    probabilities: np.ndarray  # [N, C]
    top1: float = 0.0
    top5: float = 0.0
    per_class: list[float | None] = field(default_factory=list)  # None: no images of that class
    mean_per_class: float = 0.0
    confusion: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))  # [truth, predicted]


def score(setting: PromptSetting, probabilities: np.ndarray, truth: np.ndarray, classes: int) -> SettingResult:
    order = ranked(probabilities, None)
    predicted = order[:, 0]
    correct = predicted == truth
    in_top5 = (order[:, : min(5, classes)] == truth[:, None]).any(axis=1)
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    per_class: list[float | None] = [
        float(correct[truth == c].mean()) if (truth == c).any() else None for c in range(classes)
    ]
    present = [a for a in per_class if a is not None]
    return SettingResult(
        setting,
        probabilities,
        top1=float(correct.mean()),
        top5=float(in_top5.mean()),
        per_class=per_class,
        mean_per_class=float(np.mean(present)),
        confusion=confusion,
    )


@dataclass
class Evaluation:
    dataset: Dataset
    backend: str
    model: str
    source: str
    results: list[SettingResult]  # the main setting first

    @property
    def main(self) -> SettingResult:
        return self.results[0]


def evaluate(
    backend: Backend, dataset: Dataset, settings: Sequence[PromptSetting], progress: Progress = lambda _: None
) -> Evaluation:
    probabilities = backend.probabilities(dataset, settings, progress)
    results = [score(s, probabilities[s.name], dataset.truth, len(dataset.classes)) for s in settings]
    return Evaluation(dataset, type(backend).__name__, backend.model, backend.source, results)


# --- reports -------------------------------------------------------------------------------------------------


def markdown(evaluation: Evaluation) -> str:
    dataset = evaluation.dataset
    lines = [
        f"Zero-shot evaluation of {evaluation.model} ({evaluation.source}) on {dataset.root}: "
        f"{len(dataset.images)} images, {len(dataset.classes)} classes."
        + (f" Left out, unreadable: {len(dataset.skipped)} file(s) (listed in eval.json)." if dataset.skipped else ""),
        "",
        "| setting | top-1 | top-5 | mean per-class | images |",
        "|---|---|---|---|---|",
    ]
    # The table keeps the paper's order (bare, photo, ensemble); the main setting is marked.
    ordered = list(reversed(evaluation.results)) if _is_default(evaluation) else evaluation.results
    for result in ordered:
        mark = " (main)" if result is evaluation.main and len(ordered) > 1 else ""
        lines.append(
            f"| {result.setting.description}{mark} | {result.top1:.1%} | {result.top5:.1%} | "
            f"{result.mean_per_class:.1%} | {len(dataset.images)} |"
        )
    main = evaluation.main
    lines += [
        "",
        f"Per-class accuracy ({main.setting.description}):",
        "",
        "| class | top-1 | images |",
        "|---|---|---|",
    ]
    for name, accuracy, count in zip(dataset.classes, main.per_class, dataset.counts(), strict=True):
        lines.append(f"| {name} | {'—' if accuracy is None else f'{accuracy:.1%}'} | {count} |")
    return "\n".join(lines) + "\n"


def _is_default(evaluation: Evaluation) -> bool:
    return [r.setting.name for r in evaluation.results] == list(reversed(DEFAULT_SETTINGS))


def to_json(evaluation: Evaluation) -> dict[str, Any]:
    dataset = evaluation.dataset
    relative = [str(path.relative_to(dataset.root)) for path in dataset.images]
    settings = {}
    for result in evaluation.results:
        top = ranked(result.probabilities, min(5, len(dataset.classes)))
        settings[result.setting.name] = {
            "description": result.setting.description,
            "templates": len(result.setting.templates) or None,
            "classifier": result.setting.classifier,
            "top1": result.top1,
            "top5": result.top5,
            "mean_per_class": result.mean_per_class,
            "per_class": dict(zip(dataset.classes, result.per_class, strict=True)),
            "confusion": result.confusion.tolist(),
            "predictions": [
                {
                    "image": name,
                    "truth": dataset.classes[truth],
                    "top": [[dataset.classes[c], float(result.probabilities[i, c])] for c in top[i]],
                }
                for i, (name, truth) in enumerate(zip(relative, dataset.truth.tolist(), strict=True))
            ],
        }
    return {
        "model": evaluation.model,
        "backend": evaluation.backend,
        "source": evaluation.source,
        "folder": str(dataset.root),
        "classes": dataset.classes,
        "folders": dataset.folders,
        "images_per_class": dict(zip(dataset.classes, dataset.counts(), strict=True)),
        "skipped": [str(path.relative_to(dataset.root)) for path in dataset.skipped],
        "main": evaluation.main.setting.name,
        "settings": settings,
    }


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable where Pillow has FreeType
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def confusion_png(confusion: np.ndarray, classes: Sequence[str], title: str) -> Image.Image:
    """A heatmap of the row-normalised confusion matrix (rows: true class, columns: predicted), counts inside."""
    n = len(classes)
    cell = max(8, min(48, 1400 // max(n, 1)))  # a 1000-class matrix still fits a screen, if without text
    font, small = _font(14), _font(max(8, min(13, cell // 3)))
    short = [name if len(name) <= 24 else name[:23] + "…" for name in classes]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = 8 + max((int(measure.textlength(name, font=small)) for name in short), default=0)
    top = 40 + label_width  # the column labels stand upright above the grid
    left = label_width + 8
    width = max(left + n * cell + 16, 16 + int(measure.textlength(title, font=font)))
    image = Image.new("RGB", (width, top + n * cell + 16), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 8), title, fill="black", font=font)
    draw.text((8, 24), "rows: true class, columns: predicted", fill="dimgray", font=small)
    totals = confusion.sum(axis=1, keepdims=True)
    shares = confusion / np.maximum(totals, 1)
    show_counts = cell >= 20
    for r in range(n):
        y = top + r * cell
        for c in range(n):
            x = left + c * cell
            share = float(shares[r, c])
            # White to dark blue: each step of the share is visible, and text flips to white on dark cells.
            colour = tuple(int(round(255 + (target - 255) * share)) for target in (8, 48, 107))
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=colour, outline="lightgray")
            if show_counts and confusion[r, c]:
                draw.text(
                    (x + cell / 2, y + cell / 2),
                    str(int(confusion[r, c])),
                    fill="white" if share > 0.5 else "black",
                    font=small,
                    anchor="mm",
                )
        draw.text((left - 4, y + cell / 2), short[r], fill="black", font=small, anchor="rm")
    for c, name in enumerate(short):
        width = max(1, int(measure.textlength(name, font=small)) + 4)
        upright = Image.new("RGB", (width, cell), "white")
        ImageDraw.Draw(upright).text((width - 2, cell / 2), name, fill="black", font=small, anchor="rm")
        rotated = upright.rotate(90, expand=True)
        image.paste(rotated, (left + c * cell, top - 4 - rotated.height))
    return image


def write_outputs(evaluation: Evaluation, out: Path) -> tuple[Path, Path]:
    """The JSON and the main setting's confusion-matrix PNG, in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    report, picture = out / "eval.json", out / "confusion.png"
    report.write_text(json.dumps(to_json(evaluation), indent=1) + "\n", encoding="utf-8")
    main = evaluation.main
    title = f"{evaluation.model}: {main.setting.description}, top-1 {main.top1:.1%}"
    confusion_png(main.confusion, evaluation.dataset.classes, title).save(picture)
    return report, picture
