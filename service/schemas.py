"""Every request and response body of the API, in one module (what /docs shows).

The request models also state, in JSON Schema, every rule of service/inputs.py that JSON Schema can say: sizes,
lengths, patterns, which fields go together. inputs.py still checks each rule itself (with its own messages); the
schema only says it, so that a client or a fuzzer knows what is valid. Several limits are settings, so a
server publishes its own schema (`openapi`): until then they are `FromServer` placeholders. tests/service/test_fuzz.py
holds the schema and the checks to each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue

from models.label_sets import BUILTINS, builtin_label_set
from models.manifest import load_manifest
from models.templates import MAX_TEMPLATE_LENGTH, MAX_TEMPLATES, PRESETS
from service.classifiers.store import NAME_PATTERN
from service.model import model_directory
from service.settings import Settings

if TYPE_CHECKING:
    from pydantic_core import CoreSchema

EncodingFormat = Literal["float", "base64"]

# ------------------------------------------------------------------------------------ rules, as JSON Schema


class Serving(NamedTuple):
    """What a server publishes about its model: `model` must name it, `dimensions` must equal its dimension."""

    name: str
    dim: int


@dataclass(frozen=True)
class FromServer:
    """A keyword's value that only a server knows: from its settings, or from its model (None, which leaves the
    keyword out, where the model's manifest cannot be read)."""

    value: Callable[[Settings, Serving | None], Any]


def setting(name: str) -> FromServer:
    return FromServer(lambda settings, _: getattr(settings, name))


def _given_or_absent(schema: dict[str, Any]) -> None:
    """A multipart field is given or absent, never null: its schema without the null of an optional type."""
    if schema.get("default", ...) is None:
        del schema["default"]
    branches = [branch for branch in schema.pop("anyOf", []) if branch != {"type": "null"}]
    schema.update(branches[0] if len(branches) == 1 else {"anyOf": branches} if branches else {})


class Rule:
    """JSON Schema keywords for a type, in the published schema only (the input models check the rule)."""

    def __init__(self, **keywords: Any) -> None:
        self.keywords = keywords

    def __get_pydantic_json_schema__(self, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return {**handler(core_schema), **self.keywords}


# Python's whitespace, what str.strip() removes, spelled out: ECMA-262's \s (the dialect of JSON Schema) lacks
# U+001C-U+001F and U+0085 and has U+FEFF, so "\S" would call some labels that the server finds blank valid.
_SPACE = r"\u0009-\u000d\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NOT_BLANK = f"[^{_SPACE}]"
# models.templates.validate_templates: one bare "{}" for the label; "{{" and "}}" are literal braces, and any other
# brace ("{0}", "{x}", a lone "}") makes str.format fail or take no label.
TEMPLATE_PATTERN = r"^(?:[^{}]|\{\{|\}\})*\{\}(?:[^{}]|\{\{|\}\})*$"
# service.images.is_image_data_url: an /v1/embeddings input that starts so is an image.
IMAGE_DATA_URL = "^[dD][aA][tT][aA]:[iI][mM][aA][gG][eE]/"
# inputs._image_files: what a multipart image part may be sent as.
IMAGE_PART_TYPES = "image/*, application/octet-stream"
# inputs._form_top_k reads at most nine digits.
MAX_FORM_TOP_K = 999_999_999

_LABEL: dict[str, Any] = {"pattern": NOT_BLANK, "maxLength": setting("max_label_chars")}
Label = Annotated[str, Rule(**_LABEL)]
# A multipart label field: repeated, each is a label as it is; but a single one is split at commas, or read as a JSON
# list when it starts with "[" (inputs._form_labels). Which strings are then valid depends on how many fields there
# are and on JSON: beyond JSON Schema, so the format names the rule.
FormLabel = Annotated[str, Rule(format="form-label", **_LABEL)]
Base64Image = Annotated[str, Rule(format="byte")]  # base64 of an image file, or a data: URL of one
ClassifierName = Annotated[str, Rule(pattern=NAME_PATTERN.pattern)]
Templates = (
    Annotated[str, Rule(enum=list(PRESETS))]
    | Annotated[
        list[Annotated[str, Rule(pattern=TEMPLATE_PATTERN, maxLength=MAX_TEMPLATE_LENGTH)]],
        Rule(minItems=1, maxItems=MAX_TEMPLATES),
    ]
    | None
)


def _builtin_label_sets(settings: Settings, _: Serving | None) -> list[str]:
    # A built-in set larger than the server's classifier limit is refused like any other label list (none may be
    # left: an empty enum, which no value matches).
    return [name for name in BUILTINS if len(builtin_label_set(name)[0]) <= settings.max_classifier_labels]


_TEMPLATES_HELP = (
    'Prompt templates: a preset name ("imagenet" = the paper\'s 80, "simple", "photo", "bare") or a list of '
    'strings that each contain "{}" where the label goes. Default: the server\'s CLIPSERVE_DEFAULT_TEMPLATES.'
)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassifyRequest(_Body):
    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {
                    "title": "with labels",
                    "required": ["labels"],
                    "properties": {
                        "labels": {"type": "array"},
                        "classifier": {"type": "null"},
                        "examples_weight": {"type": "null"},
                    },
                },
                {
                    "title": "with a saved classifier",
                    "required": ["classifier"],
                    "properties": {
                        "classifier": {"type": "string"},
                        "labels": {"type": "null"},
                        "templates": {"type": "null"},
                    },
                },
            ]
        }
    )

    images: Annotated[list[Base64Image], Rule(maxItems=setting("max_images"))] = Field(
        ..., min_length=1, description="Images as base64 (plain or a data: URL); JPEG, PNG, WebP, GIF, BMP, TIFF."
    )
    labels: Annotated[list[Label], Rule(maxItems=setting("max_labels"))] | None = Field(
        None, min_length=1, description="The candidate labels, any text; or name a saved `classifier` instead."
    )
    classifier: ClassifierName | None = Field(
        None, description="A saved classifier (PUT /v1/classifiers/{name}) to use."
    )
    examples_weight: float | None = Field(
        None,
        ge=0,
        le=100,
        allow_inf_nan=False,
        description="How much a classifier's few-shot examples count (0: zero-shot); default 1.",
    )
    templates: Templates = Field(None, description=_TEMPLATES_HELP)
    top_k: int | None = Field(None, ge=1, description="Return only the k most probable labels per image.")


class ClassifyForm(BaseModel):
    """/classify as multipart/form-data: the same request with image files instead of base64. A form has no null:
    a field is given or absent."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {
                    "title": "with labels",
                    "required": ["labels"],
                    "properties": {"classifier": False, "examples_weight": False},
                },
                {
                    "title": "with a saved classifier",
                    "required": ["classifier"],
                    "properties": {"labels": False, "templates": False},
                },
            ]
        }
    )

    image: Annotated[list[bytes], Rule(maxItems=setting("max_images"))] = Field(
        ..., min_length=1, description="Image files (repeat the field, or use 'images'); any image/* type."
    )
    labels: Annotated[list[FormLabel], Rule(maxItems=setting("max_labels"))] | None = Field(
        None,
        min_length=1,
        json_schema_extra=_given_or_absent,
        description="Repeated fields, or one field with a JSON list or comma-separated labels.",
    )
    classifier: ClassifierName | None = Field(
        None, json_schema_extra=_given_or_absent, description="A saved classifier to use instead of labels."
    )
    examples_weight: float | None = Field(
        None,
        ge=0,
        le=100,
        allow_inf_nan=False,
        json_schema_extra=_given_or_absent,
        description="How much a classifier's examples count.",
    )
    templates: Annotated[str, Rule(enum=list(PRESETS))] | None = Field(
        None,
        json_schema_extra=_given_or_absent,
        description="A preset name, or a JSON list of templates. " + _TEMPLATES_HELP,
    )
    top_k: int | None = Field(
        None,
        ge=1,
        le=MAX_FORM_TOP_K,
        json_schema_extra=_given_or_absent,
        description="Return only the k most probable labels per image.",
    )


class LabelScore(BaseModel):
    label: str = Field(..., description="The label as sent.")
    probability: float = Field(
        ...,
        description="softmax over the request's labels of logit_scale x cosine (sigmoid with the model's bias "
        "for sigmoid models, where probabilities do not sum to 1).",
    )
    score: float = Field(..., description="Raw cosine similarity between the image and the label vector.")


class ImageResult(BaseModel):
    labels: list[LabelScore] = Field(..., description="Labels sorted by probability, highest first.")


class Timing(BaseModel):
    total_ms: float = Field(..., description="Server time for the whole request.")
    images_ms: float = Field(..., description="Decode, preprocess, queue and image engine.")
    labels_ms: float = Field(..., description="Label vectors: cache lookups and text engine for misses.")
    similarity_ms: float = Field(..., description="Cosine, scaling and ranking.")


class ClassifyResponse(BaseModel):
    model: str = Field(..., description="Name of the served model.")
    classifier: str | None = Field(None, description="The saved classifier used, when the request named one.")
    results: list[ImageResult] = Field(..., description="One entry per image, in request order.")
    timing: Timing


class ClassifierRequest(_Body):
    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {
                    "title": "labels",
                    "required": ["labels"],
                    "properties": {"labels": {"type": "array"}, "builtin": {"type": "null"}},
                },
                {
                    "title": "a built-in label set",
                    "required": ["builtin"],
                    "properties": {"builtin": {"type": "string"}, "labels": {"type": "null"}},
                },
            ]
        }
    )

    labels: Annotated[list[Label], Rule(maxItems=setting("max_classifier_labels"), uniqueItems=True)] | None = Field(
        None, min_length=1, description="The classifier's labels (up to CLIPSERVE_MAX_CLASSIFIER_LABELS), each once."
    )
    builtin: Annotated[str, Rule(enum=FromServer(_builtin_label_sets))] | None = Field(
        None,
        description='A built-in label set instead of labels: "imagenet-1k" (the 1,000 ImageNet classes, with the '
        "paper's 80 templates unless templates are given).",
    )
    templates: Templates = Field(None, description=_TEMPLATES_HELP)


class ExamplesRequest(_Body):
    label: Label = Field(..., description="One of the classifier's labels.")
    images: Annotated[list[Base64Image], Rule(maxItems=setting("max_images"))] = Field(
        ..., min_length=1, description="Example images as base64 (plain or a data: URL)."
    )


class ExamplesForm(BaseModel):
    """Examples as multipart/form-data: a `label` field and image files."""

    label: Label = Field(..., description="One of the classifier's labels.")
    image: Annotated[list[bytes], Rule(maxItems=setting("max_images"))] = Field(
        ..., min_length=1, description="Example image files (repeat the field)."
    )


class ClassifierStatus(BaseModel):
    name: str
    status: Literal["preparing", "ready", "failed"] = Field(
        ..., description="preparing: label vectors are being computed in the background; /classify answers 409."
    )
    label_count: int
    templates: list[str]
    prompts_prepared: int = Field(..., description="Labels x templates encoded or found cached so far.")
    prompts_total: int
    eta_s: float | None = Field(None, description="Seconds left at this replica's encoding rate, while preparing.")
    model: str = Field(..., description="The served model the vectors are prepared for.")
    content_hash: str = Field(..., description="That model's content hash: another model prepares its own vectors.")
    examples_per_label: dict[str, int] = Field(
        default_factory=dict, description="Few-shot example images, for the labels that have any."
    )
    error: str | None = Field(None, description="Why preparation failed.")
    labels: list[str] | None = Field(None, description="The labels (GET of one classifier only).")


class ClassifierList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ClassifierStatus]


# /embed's texts: without templates any text up to max_text_chars (an image data: URL of any length, as
# inputs.check_texts lets it through); with templates, labels.
_TEXT = {"anyOf": [{"maxLength": setting("max_text_chars")}, {"pattern": IMAGE_DATA_URL}]}
_TEXTS_BY_TEMPLATES: dict[str, Any] = {
    "if": {"properties": {"templates": {"type": "null"}}},
    "then": {"properties": {"texts": {"maxItems": setting("max_texts"), "items": _TEXT}}},
    "else": {"properties": {"texts": {"maxItems": setting("max_labels"), "items": _LABEL}}},
}


class EmbedRequest(_Body):
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"title": "images", "required": ["images"], "properties": {"images": {"type": "array", "minItems": 1}}},
                {"title": "texts", "required": ["texts"], "properties": {"texts": {"type": "array", "minItems": 1}}},
            ],
            **_TEXTS_BY_TEMPLATES,
        }
    )

    images: Annotated[list[Base64Image], Rule(maxItems=setting("max_images"))] | None = Field(
        None, description="Images as base64 (plain or data: URL)."
    )
    texts: list[str] | None = Field(None, description="Texts to embed; at least one image or text in all.")
    templates: Templates = Field(
        None,
        description="If given, each text is treated as a label and embedded as the renormalised mean over these "
        "templates (the vector /classify uses). Without it, texts are embedded as they are.",
    )
    encoding_format: EncodingFormat = Field("float", description="float lists, or base64 of little-endian float32.")


class EmbedResponse(BaseModel):
    model: str
    dim: int = Field(..., description="Embedding dimension.")
    images: list[list[float] | str] | None = Field(None, description="L2-normalised image embeddings.")
    texts: list[list[float] | str] | None = Field(None, description="L2-normalised text embeddings.")


# An /v1/embeddings input is a text, or an image as a data: URL ("data-url": the image must decode, beyond a schema).
_OPENAI_TEXT = {"maxLength": setting("max_text_chars"), "not": {"pattern": IMAGE_DATA_URL}}
_OPENAI_IMAGE = {"pattern": IMAGE_DATA_URL, "format": "data-url"}
OpenAIInput = Annotated[str, Rule(anyOf=[_OPENAI_TEXT, _OPENAI_IMAGE])]


class OpenAIEmbeddingsRequest(BaseModel):
    """The OpenAI embeddings API: texts, and images as data: URLs."""

    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we have no use for (user, ...)
    input: (
        OpenAIInput
        | Annotated[
            list[OpenAIInput],
            Rule(
                minItems=1,
                maxItems=setting("max_texts"),
                contains=_OPENAI_IMAGE,
                minContains=0,
                maxContains=setting("max_images"),
            ),
        ]
    ) = Field(..., description="Text(s); an item that is a data:image/... URL is an image.")
    model: Annotated[str, Rule(enum=[FromServer(lambda _, model: model and model.name)])] | None = Field(
        None, description="Must be the served model's name when given."
    )
    encoding_format: EncodingFormat = "float"
    dimensions: Annotated[int, Field(ge=1), Rule(enum=[FromServer(lambda _, model: model and model.dim)])] | None = (
        Field(None, description="Must equal the model's dimension when given.")
    )


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "clipserve"
    embed_dim: int
    image_size: int
    context_length: int
    activation: str
    engine: str = Field(..., description="Runtime, provider and precision serving the encoders.")
    content_hash: str = Field(..., description="Identity of the exported model (label-cache keys include it).")
    source: dict = Field(..., description="Where the weights came from (manifest 'source').")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    code: str = Field(..., description="Stable machine-readable code, e.g. invalid_input, overloaded.")
    message: str = Field(..., description="What went wrong, for people.")
    param: str | None = Field(None, description="The request field at fault, when there is one.")
    request_id: str | None = Field(
        None, description="The request's id, as in the X-Request-ID response header and the server's log line."
    )


class ErrorResponse(BaseModel):
    error: ErrorDetail


_UNKNOWN = object()  # a FromServer without a value: the keyword that holds it is left out


def _published(node: Any, settings: Settings, model: Serving | None) -> Any:
    """`node` with every FromServer filled in."""
    if isinstance(node, FromServer):
        value = node.value(settings, model)
        return _UNKNOWN if value is None else value
    if isinstance(node, dict):
        filled = {key: _published(value, settings, model) for key, value in node.items()}
        return {key: value for key, value in filled.items() if value is not _UNKNOWN}
    if isinstance(node, list):
        items = [_published(value, settings, model) for value in node]
        return _UNKNOWN if _UNKNOWN in items else items
    return node


def _schema(model_class: type[BaseModel], settings: Settings, model: Serving | None) -> dict[str, Any]:
    schema = _published(model_class.model_json_schema(), settings, model)
    # "$ref": "#/$defs/..." would point into the OpenAPI document's root, where no $defs are.
    if "$defs" in schema:
        raise TypeError("request models must not nest models; give them flat fields")
    return schema


# Request models by their schema's title, so that `openapi` finds the models of each request body it publishes.
_REQUEST_MODELS: dict[str, type[BaseModel]] = {}


def request_body(json_model: type[BaseModel], form_model: type[BaseModel] | None = None) -> dict[str, Any]:
    """The OpenAPI requestBody of a route whose input dependency reads the body itself, generated from its wire
    models: FastAPI only documents body parameters, and one parameter cannot have two content types. The limits are
    the default settings' until `openapi` publishes an app's own."""
    settings = Settings.model_construct()  # the defaults, without reading the environment
    content: dict[str, Any] = {"application/json": {"schema": _schema(json_model, settings, None)}}
    if form_model is not None:
        schema = _schema(form_model, settings, None)
        files = [
            name for name, field in schema["properties"].items() if field.get("items", {}).get("format") == "binary"
        ]
        content["multipart/form-data"] = {
            "schema": schema,
            "encoding": {name: {"contentType": IMAGE_PART_TYPES} for name in files},
        }
    for model_class in (json_model, form_model):
        if model_class is not None:
            _REQUEST_MODELS[model_class.model_json_schema()["title"]] = model_class
    return {"required": True, "content": content}


def _serving(app: FastAPI) -> Serving | None:
    pipeline = getattr(app.state, "pipeline", None)
    if pipeline is not None:
        return Serving(pipeline.model.name, pipeline.model.manifest.embed_dim)
    try:  # before the model loads, its manifest says the same (the artifacts are verified when it loads)
        manifest = load_manifest(model_directory(app.state.settings), verify=False)
    except (OSError, ValueError):
        return None  # the server will not start either; the schema leaves the model's values out
    return Serving(manifest.name, manifest.embed_dim)


def openapi(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document, stating the limits of its own settings and its model's name and dimension:
    what create_app puts in place of FastAPI's `app.openapi`. Made once per app, as FastAPI's is."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    document = FastAPI.openapi(app)
    model = _serving(app)
    for path in document["paths"].values():
        for operation in path.values():
            for media in operation.get("requestBody", {}).get("content", {}).values():
                model_class = _REQUEST_MODELS.get(media["schema"].get("title"))
                if model_class is not None:
                    media["schema"] = _schema(model_class, app.state.settings, model)
    return document
