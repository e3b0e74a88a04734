"""Every request and response body of the API, in one module (what /docs shows)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Templates = str | list[str] | None
EncodingFormat = Literal["float", "base64"]

_TEMPLATES_HELP = (
    'Prompt templates: a preset name ("imagenet" = the paper\'s 80, "simple", "photo", "bare") or a list of '
    'strings that each contain "{}" where the label goes. Default: the server\'s CLIPSERVE_DEFAULT_TEMPLATES.'
)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassifyRequest(_Body):
    images: list[str] = Field(
        ..., min_length=1, description="Images as base64 (plain or a data: URL); JPEG, PNG, WebP, GIF, BMP, TIFF."
    )
    labels: list[str] | None = Field(
        None, min_length=1, description="The candidate labels, any text; or name a saved `classifier` instead."
    )
    classifier: str | None = Field(None, description="A saved classifier (PUT /v1/classifiers/{name}) to use.")
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
    """/classify as multipart/form-data: the same request with image files instead of base64."""

    image: list[bytes] = Field(
        ..., min_length=1, description="Image files (repeat the field, or use 'images'); any image/* type."
    )
    labels: list[str] | None = Field(
        None, min_length=1, description="Repeated fields, or one field with a JSON list or comma-separated labels."
    )
    classifier: str | None = Field(None, description="A saved classifier to use instead of labels.")
    examples_weight: float | None = Field(
        None, ge=0, le=100, allow_inf_nan=False, description="How much a classifier's examples count."
    )
    templates: str | None = Field(None, description="A preset name, or a JSON list of templates. " + _TEMPLATES_HELP)
    top_k: int | None = Field(None, ge=1, description="Return only the k most probable labels per image.")


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
    labels: list[str] | None = Field(
        None, min_length=1, description="The classifier's labels (up to CLIPSERVE_MAX_CLASSIFIER_LABELS)."
    )
    builtin: str | None = Field(
        None,
        description='A built-in label set instead of labels: "imagenet-1k" (the 1,000 ImageNet classes, with the '
        "paper's 80 templates unless templates are given).",
    )
    templates: Templates = Field(None, description=_TEMPLATES_HELP)


class ExamplesRequest(_Body):
    label: str = Field(..., description="One of the classifier's labels.")
    images: list[str] = Field(..., min_length=1, description="Example images as base64 (plain or a data: URL).")


class ExamplesForm(BaseModel):
    """Examples as multipart/form-data: a `label` field and image files."""

    label: str = Field(..., description="One of the classifier's labels.")
    image: list[bytes] = Field(..., min_length=1, description="Example image files (repeat the field).")


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


class EmbedRequest(_Body):
    images: list[str] | None = Field(None, description="Images as base64 (plain or data: URL).")
    texts: list[str] | None = Field(None, description="Texts to embed.")
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


class OpenAIEmbeddingsRequest(BaseModel):
    """The OpenAI embeddings API: texts, and images as data: URLs."""

    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we have no use for (user, ...)
    input: str | list[str] = Field(..., description="Text(s); an item that is a data:image/... URL is an image.")
    model: str | None = Field(None, description="Must be the served model's name when given.")
    encoding_format: EncodingFormat = "float"
    dimensions: int | None = Field(None, ge=1, description="Must equal the model's dimension when given.")


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


class ErrorResponse(BaseModel):
    error: ErrorDetail


def request_body(json_model: type[BaseModel], form_model: type[BaseModel] | None = None) -> dict[str, Any]:
    """The OpenAPI requestBody of a route whose input dependency reads the body itself, generated from its wire
    models: FastAPI only documents body parameters, and one parameter cannot have two content types."""
    content = {"application/json": {"schema": json_model.model_json_schema()}}
    if form_model is not None:
        content["multipart/form-data"] = {"schema": form_model.model_json_schema()}
    for media in content.values():
        # "$ref": "#/$defs/..." would point into the OpenAPI document's root, where no $defs are.
        if "$defs" in media["schema"]:
            raise TypeError("request models must not nest models; give them flat fields")
    return {"required": True, "content": content}
