"""Typed inputs of the API routes: each request body parsed once, into one model per route, every limit
checked here and nowhere else.

A route receives its input from a FastAPI dependency (`classify_input`, `embed_input`, `embeddings_input`).
The dependency reads the body (JSON, or multipart for /classify) into its wire model from service/schemas.py,
then builds the route's input model, whose validators check every CLIPSERVE_MAX_* limit against the settings
passed as validation context. Every failure is one `InvalidInput` (422, naming the field) or, for a body
that is not JSON at all, one `InvalidRequest` (400): the pipeline behind the routes trusts what it gets.

Images stay as sent (bytes or base64 text) until a worker thread decodes them with the pixels, so a 20 MB
base64 body costs the event loop nothing but the JSON parse.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Path, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from starlette.datastructures import FormData, UploadFile

from models.label_sets import UnknownLabelSet, builtin_label_set
from models.templates import TemplateError, resolve_templates
from service import request_context, schemas
from service.classifiers.store import NAME_PATTERN
from service.dependencies import pipeline
from service.errors import InvalidInput, InvalidRequest, NotFound, UnsupportedMediaType
from service.images import ImageInput, is_image_data_url
from service.settings import Settings

_IMAGE_CONTENT_TYPES = ("image/", "application/octet-stream")  # schemas.IMAGE_PART_TYPES says so
# Documented only: ClassifierInput checks the name itself, with its own message (and the other routes answer 404).
NameInPath = Annotated[str, Path(json_schema_extra={"pattern": NAME_PATTERN.pattern})]


@dataclass(frozen=True)
class Served:
    """What the input models check against: the limits, and the model the server serves."""

    settings: Settings
    model: str
    dim: int


# ------------------------------------------------------------------------------------------ the limits, once


def check_image_count(count: int, settings: Settings, param: str) -> None:
    if count > settings.max_images:
        raise InvalidInput(f"{count} images; the limit is {settings.max_images}", param=param)


def check_labels(labels: Sequence[str], settings: Settings, param: str, *, limit: int | None = None) -> None:
    limit = settings.max_labels if limit is None else limit
    if not labels:
        raise InvalidInput("give at least one label", param=param)
    if len(labels) > limit:
        raise InvalidInput(f"{len(labels)} labels; the limit is {limit}", param=param)
    for i, label in enumerate(labels):
        if not label.strip():
            raise InvalidInput(f"{param}[{i}] is empty", param=f"{param}[{i}]")
        if len(label) > settings.max_label_chars:
            raise InvalidInput(
                f"{param}[{i}] has {len(label)} characters; the limit is {settings.max_label_chars}",
                param=f"{param}[{i}]",
            )


def check_prompts(labels: int, templates: int, settings: Settings) -> None:
    prompts = labels * templates
    if prompts > settings.max_prompts:
        raise InvalidInput(
            f"{labels} labels x {templates} templates = {prompts:,} prompts; the limit is "
            f"{settings.max_prompts:,} (CLIPSERVE_MAX_PROMPTS)",
            param="labels",
        )


def check_texts(texts: Sequence[str], settings: Settings, param: str) -> None:
    if len(texts) > settings.max_texts:
        raise InvalidInput(f"{len(texts)} texts; the limit is {settings.max_texts}", param=param)
    for i, text in enumerate(texts):
        # CLIP reads at most a few dozen tokens; a megabyte of text only costs tokenizer time.
        if len(text) > settings.max_text_chars and not is_image_data_url(text):
            raise InvalidInput(
                f"{param}[{i}] has {len(text):,} characters; the limit is {settings.max_text_chars:,}",
                param=f"{param}[{i}]",
            )


def templates_or_default(templates: str | Sequence[str] | None, settings: Settings) -> tuple[str, ...]:
    try:
        return resolve_templates(templates if templates is not None else settings.default_templates)
    except TemplateError as error:
        raise InvalidInput(str(error), param="templates") from error


def _served(info: ValidationInfo) -> Served:
    if not isinstance(info.context, Served):
        raise TypeError("input models are validated with context=Served(...)")  # a bug, not a client error
    return info.context


# ------------------------------------------------------------------------------------------ the input models


class _Input(BaseModel):
    # Images are checked with isinstance, not copied; the models are built once and never changed.
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)


class _WithTemplates(_Input):
    templates: tuple[str, ...]  # resolved: a preset name or the server's default becomes its templates

    @field_validator("templates", mode="before")
    @classmethod
    def _resolved(cls, templates: Any, info: ValidationInfo) -> tuple[str, ...]:
        return templates_or_default(templates, _served(info).settings)


class ClassifyInput(_WithTemplates):
    images: list[ImageInput]
    labels: list[str]  # empty when a saved classifier is named
    classifier: str | None = None
    top_k: int | None = Field(ge=1)
    # A classifier's few-shot examples: None is the default weight; bounded, so the blend stays finite.
    examples_weight: float | None = Field(None, ge=0, le=100, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _labels_or_classifier(cls, fields: Any) -> Any:
        if not isinstance(fields, dict):
            return fields
        if fields.get("classifier") is None:
            if fields.get("examples_weight") is not None:
                raise InvalidInput("examples_weight applies to a saved classifier's examples", param="examples_weight")
            if fields.get("labels") is None:
                raise InvalidInput("give labels, or the name of a saved classifier", param="labels")
            return fields
        if fields.get("labels") is not None:
            raise InvalidInput("give labels or a classifier, not both", param="classifier")
        if fields.get("templates") is not None:
            raise InvalidInput("a saved classifier has its own templates; do not send templates", param="templates")
        return fields | {"labels": []}

    @model_validator(mode="after")
    def _within_limits(self, info: ValidationInfo) -> ClassifyInput:
        settings = _served(info).settings
        if self.classifier is None:
            check_labels(self.labels, settings, "labels")
        # Multipart's files come as "image", JSON's as "images": the error names the field the client used.
        check_image_count(len(self.images), settings, self.images[0].field if self.images else "images")
        if self.classifier is None:
            check_prompts(len(self.labels), len(self.templates), settings)
        return self


class ClassifierInput(_WithTemplates):
    """A saved classifier's definition, from PUT /v1/classifiers/{name}: labels, or a built-in label set."""

    name: str
    labels: list[str]

    @model_validator(mode="before")
    @classmethod
    def _labels_or_builtin(cls, fields: Any) -> Any:
        if not isinstance(fields, dict) or fields.get("builtin") is None:
            if isinstance(fields, dict) and fields.get("labels") is None:
                raise InvalidInput("give labels, or a built-in label set ('builtin')", param="labels")
            if isinstance(fields, dict):
                # A label is a row that examples attach to: two rows of the same text would be ambiguous.
                seen: dict[str, int] = {}
                for i, label in enumerate(fields["labels"]):
                    if label in seen:
                        raise InvalidInput(f"labels[{i}] repeats labels[{seen[label]}]", param=f"labels[{i}]")
                    seen[label] = i
            return fields
        if fields.get("labels") is not None:
            raise InvalidInput("give labels or a built-in label set, not both", param="builtin")
        try:
            labels, preset = builtin_label_set(fields["builtin"])
        except UnknownLabelSet as error:
            raise InvalidInput(str(error), param="builtin") from error
        return fields | {"labels": list(labels), "templates": fields.get("templates") or preset}

    @model_validator(mode="after")
    def _within_limits(self, info: ValidationInfo) -> ClassifierInput:
        settings = _served(info).settings
        if not NAME_PATTERN.fullmatch(self.name):
            raise InvalidInput(
                "a classifier name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
                param="name",
            )
        check_labels(self.labels, settings, "labels", limit=settings.max_classifier_labels)
        return self


class EmbedInput(_Input):
    images: list[ImageInput]
    texts: list[str]
    templates: tuple[str, ...] | None  # given: texts are labels, embedded as /classify's label vectors
    encoding_format: schemas.EncodingFormat

    @field_validator("templates", mode="before")
    @classmethod
    def _resolved(cls, templates: Any, info: ValidationInfo) -> tuple[str, ...] | None:
        return None if templates is None else templates_or_default(templates, _served(info).settings)

    @model_validator(mode="after")
    def _within_limits(self, info: ValidationInfo) -> EmbedInput:
        settings = _served(info).settings
        if not self.images and not self.texts:
            raise InvalidInput("give images, texts or both", param="images")
        check_image_count(len(self.images), settings, "images")
        if self.texts and self.templates is not None:
            check_labels(self.texts, settings, "texts")
            check_prompts(len(self.texts), len(self.templates), settings)
        elif self.texts:
            check_texts(self.texts, settings, "texts")
        return self


class EmbeddingsInput(_Input):
    """The OpenAI embeddings request: a list where data:image/... URLs are images and the rest texts."""

    inputs: list[str]
    model: str | None
    dimensions: int | None
    encoding_format: schemas.EncodingFormat

    @model_validator(mode="after")
    def _within_limits(self, info: ValidationInfo) -> EmbeddingsInput:
        served = _served(info)
        if self.model is not None and self.model != served.model:
            raise NotFound(
                f"model {self.model!r} is not served here; this server serves {served.model!r}", param="model"
            )
        if self.dimensions is not None and self.dimensions != served.dim:
            raise InvalidInput(f"this model's embeddings have {served.dim} dimensions", param="dimensions")
        if not self.inputs:
            raise InvalidInput("input must not be empty", param="input")
        check_texts(self.inputs, served.settings, "input")
        check_image_count(len(self.image_rows), served.settings, "input")
        return self

    @property
    def image_rows(self) -> list[int]:
        return [i for i, item in enumerate(self.inputs) if is_image_data_url(item)]

    @property
    def text_rows(self) -> list[int]:
        return [i for i, item in enumerate(self.inputs) if not is_image_data_url(item)]

    @property
    def images(self) -> list[ImageInput]:
        return [ImageInput(self.inputs[i], f"input[{i}]") for i in self.image_rows]

    @property
    def texts(self) -> list[str]:
        return [self.inputs[i] for i in self.text_rows]


# ---------------------------------------------------------------------------------- reading and validating


def _field(location: Sequence[Any]) -> str:
    # ("labels", 3) -> "labels[3]"; ("a", "b") -> "a.b"
    return ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in location).replace(".[", "[")


def validated(model: type[BaseModel], data: bytes | dict[str, Any], context: Served | None = None) -> Any:
    """`model` from a JSON body or a dict, with pydantic's first complaint as the one validation error."""
    try:
        if isinstance(data, bytes):
            return model.model_validate_json(data, context=context)
        return model.model_validate(data, context=context)
    except ValidationError as error:
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            raise InvalidRequest(f"body is not valid JSON: {first['msg']}") from error
        location = _field(first["loc"])
        raise InvalidInput(f"{location or 'body'}: {first['msg']}", param=location or None) from error


def served(request: Request) -> Served:
    model = pipeline(request).model  # NotReady (503) while the model loads
    return Served(request.app.state.settings, model.name, model.manifest.embed_dim)


async def classify_input(request: Request) -> ClassifyInput:
    """/classify's input from JSON or multipart/form-data (the dependency the route declares)."""
    start = time.perf_counter()
    content_type = request.headers.get("content-type", "").lower()
    context = served(request)
    if content_type.startswith("multipart/form-data"):
        form = await _form(request, context.settings)
        fields = {
            "images": [ImageInput(data, f"image[{i}]") for i, data in enumerate(form.image)],
            "labels": form.labels,
            "classifier": form.classifier,
            "templates": _form_templates(form.templates),
            "top_k": form.top_k,
            "examples_weight": form.examples_weight,
        }
    elif content_type.startswith("application/json") or not content_type:
        body: schemas.ClassifyRequest = validated(schemas.ClassifyRequest, await request.body())
        fields = body.model_dump() | {
            "images": [ImageInput(text, f"images[{i}]") for i, text in enumerate(body.images)]
        }
    else:
        raise UnsupportedMediaType(f"content type {content_type}; send application/json or multipart/form-data")
    checked = validated(ClassifyInput, fields, context)
    # Reading the body (as it arrives) and checking it: the request's Server-Timing `parse`.
    request_context.note_time("parse", (time.perf_counter() - start) * 1000)
    return checked


async def classifier_input(name: NameInPath, request: Request) -> ClassifierInput:
    body: schemas.ClassifierRequest = validated(schemas.ClassifierRequest, await request.body())
    return validated(ClassifierInput, body.model_dump() | {"name": name}, served(request))


class ExamplesInput(_Input):
    """Few-shot examples for one label of a saved classifier (POST /v1/classifiers/{name}/examples)."""

    name: str
    label: str
    images: list[ImageInput]

    @model_validator(mode="after")
    def _within_limits(self, info: ValidationInfo) -> ExamplesInput:
        check_image_count(len(self.images), _served(info).settings, self.images[0].field if self.images else "images")
        return self


async def examples_input(name: NameInPath, request: Request) -> ExamplesInput:
    """JSON (`label`, base64 `images`) or multipart (`label` and image files)."""
    content_type = request.headers.get("content-type", "").lower()
    context = served(request)
    if content_type.startswith("multipart/form-data"):
        settings = context.settings
        form = await request.form(
            max_files=settings.max_images + 1, max_fields=16, max_part_size=settings.max_body_bytes
        )
        files = await _image_files(form)
        parsed = validated(schemas.ExamplesForm, {"label": _text_field(form.get("label")), "image": files})
        images = [ImageInput(data, f"image[{i}]") for i, data in enumerate(parsed.image)]
        label = parsed.label
    elif content_type.startswith("application/json") or not content_type:
        body: schemas.ExamplesRequest = validated(schemas.ExamplesRequest, await request.body())
        images = [ImageInput(text, f"images[{i}]") for i, text in enumerate(body.images)]
        label = body.label
    else:
        raise UnsupportedMediaType(f"content type {content_type}; send application/json or multipart/form-data")
    return validated(ExamplesInput, {"name": name, "label": label, "images": images}, context)


async def embed_input(request: Request) -> EmbedInput:
    body: schemas.EmbedRequest = validated(schemas.EmbedRequest, await request.body())
    images = [ImageInput(text, f"images[{i}]") for i, text in enumerate(body.images or [])]
    fields = body.model_dump() | {"images": images, "texts": body.texts or []}
    return validated(EmbedInput, fields, served(request))


async def embeddings_input(request: Request) -> EmbeddingsInput:
    body: schemas.OpenAIEmbeddingsRequest = validated(schemas.OpenAIEmbeddingsRequest, await request.body())
    fields = body.model_dump() | {"inputs": [body.input] if isinstance(body.input, str) else body.input}
    return validated(EmbeddingsInput, fields, served(request))


async def _form(request: Request, settings: Settings) -> schemas.ClassifyForm:
    # Starlette answers a malformed multipart body with HTTPException(400), which errors.py maps to the shape.
    form = await request.form(
        max_files=settings.max_images + 1, max_fields=settings.max_labels + 16, max_part_size=settings.max_body_bytes
    )
    images = await _image_files(form)
    return validated(
        schemas.ClassifyForm,
        {
            "image": images,
            "labels": _form_labels([v for v in form.getlist("labels") if isinstance(v, str)]),
            "classifier": _text_field(form.get("classifier")),
            "templates": _text_field(form.get("templates")),
            "top_k": _form_top_k(_text_field(form.get("top_k"))),
            "examples_weight": _text_field(form.get("examples_weight")),
        },
    )


async def _image_files(form: FormData) -> list[bytes]:
    """The `image` (or `images`) file parts, each checked to be an image upload; at least one."""
    uploads = [v for key in ("image", "images") for v in form.getlist(key)]
    images = []
    for i, upload in enumerate(uploads):
        param = f"image[{i}]"
        if not isinstance(upload, UploadFile):
            raise InvalidInput(f"{param} must be a file upload", param=param)
        content_type = (upload.content_type or "application/octet-stream").lower()
        if not content_type.startswith(_IMAGE_CONTENT_TYPES):
            raise UnsupportedMediaType(f"{param} has content type {content_type}; send an image", param=param)
        images.append(await upload.read())
    if not images:
        raise InvalidInput("send at least one 'image' file", param="image")
    return images


def _text_field(value: object) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _json_list(text: str, param: str) -> list[str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidInput(f"{param}: not a valid JSON list ({error.msg})", param=param) from error
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidInput(f"{param}: must be a JSON list of strings", param=param)
    return value


def _form_labels(values: list[str]) -> list[str] | None:
    """Repeated `labels` fields, or one field holding a JSON list, or one comma-separated field; None if absent."""
    if not values:
        return None
    if len(values) == 1:
        text = values[0]
        return _json_list(text, "labels") if text.lstrip().startswith("[") else [v.strip() for v in text.split(",")]
    return values


def _form_templates(text: str | None) -> str | list[str] | None:
    return _json_list(text, "templates") if text is not None and text.lstrip().startswith("[") else text


def _form_top_k(text: str | None) -> int | None:
    if text is None:
        return None
    digits = text.strip()
    # isascii: "²".isdigit() is True but int("²") fails; the length cap keeps int() cheap.
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 9) or int(digits) < 1:
        raise InvalidInput("top_k must be a positive integer", param="top_k")
    return int(digits)
