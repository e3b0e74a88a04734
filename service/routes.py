"""HTTP routes. Each parses its input, hands the work to the pipeline, and shapes the answer."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from service import schemas
from service.errors import (
    ClientClosedRequest,
    DeadlineExceeded,
    InvalidInput,
    InvalidRequest,
    NotFound,
    NotReady,
    Unauthorized,
    UnsupportedMediaType,
)
from service.images import decode_base64, is_image_data_url
from service.pipeline import Pipeline

T = TypeVar("T")
_DISCONNECT_POLL_S = 0.1
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": schemas.ErrorResponse} for status in (400, 401, 404, 413, 415, 422, 503, 504)
}
_IMAGE_CONTENT_TYPES = ("image/", "application/octet-stream")


def pipeline(request: Request) -> Pipeline:
    ready: Pipeline | None = getattr(request.app.state, "pipeline", None)
    if ready is None:
        raise NotReady("the model is still loading")
    return ready


def authorised(request: Request) -> None:
    keys: Sequence[str] = request.app.state.settings.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
    # Constant-time comparison against every key, so timing does not reveal how much of a key matched.
    if not any(secrets.compare_digest(given.encode(), key.encode()) for key in keys):
        raise Unauthorized("missing or unknown API key; send 'Authorization: Bearer <key>'")


api = APIRouter(dependencies=[Depends(authorised)], responses=_ERRORS)
probes = APIRouter()


async def serve(request: Request, work: Awaitable[T]) -> T:
    """Runs `work` under the request deadline, and stops it if the client goes away."""
    task = asyncio.ensure_future(work)
    disconnected = False

    async def watch_disconnect() -> None:
        nonlocal disconnected
        while not task.done():
            if await request.is_disconnected():
                disconnected = True
                task.cancel()  # frees the request's batcher slots; nobody is waiting for the answer
                return
            await asyncio.sleep(_DISCONNECT_POLL_S)

    watcher = asyncio.create_task(watch_disconnect())
    try:
        async with asyncio.timeout(request.app.state.settings.request_timeout_s):
            return await task
    except TimeoutError as error:
        raise DeadlineExceeded(f"no answer within {request.app.state.settings.request_timeout_s:g} s") from error
    except asyncio.CancelledError:
        if not disconnected:
            raise  # the server is shutting down: let the cancellation through
        # Nobody will read the answer; a plain status keeps the error-rate metrics honest (nginx's 499).
        raise ClientClosedRequest("the client closed the connection before the answer was ready") from None
    finally:
        watcher.cancel()
        task.cancel()


def _parse(model: type[BaseModel], body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            raise InvalidRequest(f"body is not valid JSON: {first['msg']}") from error
        location = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in first["loc"]).replace(".[", "[")
        raise InvalidInput(f"{location or 'body'}: {first['msg']}", param=location or None) from error


def _base64_images(texts: Sequence[str], params: list[str]) -> tuple[list[bytes], list[str]]:
    return [decode_base64(text, param) for text, param in zip(texts, params, strict=True)], params


def _encode(vectors: np.ndarray, encoding_format: str) -> list[list[float] | str]:
    if encoding_format == "base64":
        return [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    return [v.tolist() for v in vectors.astype(np.float32)]


def _classification_response(p: Pipeline, result: Any, total_ms: float) -> schemas.ClassifyResponse:
    results = [
        schemas.ImageResult(
            labels=[
                schemas.LabelScore(label=result.labels[c], probability=float(p), score=float(score))
                for c, p, score in zip(indices, probabilities, scores, strict=True)
            ]
        )
        for indices, probabilities, scores in zip(
            result.ranked.indices, result.ranked.probabilities, result.ranked.cosines, strict=True
        )
    ]
    timing = schemas.Timing(
        total_ms=round(total_ms, 3),
        images_ms=round(result.images_ms, 3),
        labels_ms=round(result.labels_ms, 3),
        similarity_ms=round(result.similarity_ms, 3),
    )
    return schemas.ClassifyResponse(model=p.model.name, results=results, timing=timing)


# ------------------------------------------------------------------------------------------------- /classify


async def _multipart(request: Request, p: Pipeline) -> tuple[list[bytes], list[str], list[str], Any, int | None]:
    settings = p.settings
    # Starlette answers a malformed multipart body with HTTPException(400), which errors.py maps to the shape.
    form = await request.form(
        max_files=settings.max_images + 1,
        max_fields=settings.max_labels + 16,
        max_part_size=settings.max_body_bytes,
    )
    uploads = [v for key in ("image", "images") for v in form.getlist(key)]
    blobs, params = [], []
    for i, upload in enumerate(uploads):
        param = f"image[{i}]"
        if not isinstance(upload, UploadFile):
            raise InvalidInput(f"{param} must be a file upload", param=param)
        content_type = (upload.content_type or "application/octet-stream").lower()
        if not content_type.startswith(_IMAGE_CONTENT_TYPES):
            raise UnsupportedMediaType(f"{param} has content type {content_type}; send an image", param=param)
        blobs.append(await upload.read())
        params.append(param)
    if not blobs:
        raise InvalidInput("send at least one 'image' file", param="image")
    p.check_image_count(len(blobs), "image")
    labels = _form_labels([v for v in form.getlist("labels") if isinstance(v, str)])
    templates_field = form.get("templates")
    templates: Any = None
    if isinstance(templates_field, str) and templates_field.strip():
        is_list = templates_field.lstrip().startswith("[")
        templates = _json_list(templates_field, "templates") if is_list else templates_field
    top_k_field = form.get("top_k")
    top_k = None
    if isinstance(top_k_field, str) and top_k_field.strip():
        digits = top_k_field.strip()
        # isascii: "²".isdigit() is True but int("²") fails; the length cap keeps int() cheap.
        if not (digits.isascii() and digits.isdigit() and len(digits) <= 9) or int(digits) < 1:
            raise InvalidInput("top_k must be a positive integer", param="top_k")
        top_k = int(digits)
    return blobs, params, labels, templates, top_k


def _json_list(text: str, param: str) -> list[str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidInput(f"{param}: not a valid JSON list ({error.msg})", param=param) from error
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidInput(f"{param}: must be a JSON list of strings", param=param)
    return value


def _form_labels(values: list[str]) -> list[str]:
    """Repeated `labels` fields, or one field holding a JSON list, or one comma-separated field."""
    if len(values) == 1:
        text = values[0]
        return _json_list(text, "labels") if text.lstrip().startswith("[") else [v.strip() for v in text.split(",")]
    return values


@api.post(
    "/classify",
    response_model=schemas.ClassifyResponse,
    summary="Rank labels for images, zero-shot",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ClassifyRequest"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image", "labels"],
                        "properties": {
                            "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
                            "labels": {
                                "type": "array",
                                "items": {"type": "string"},
                                "description": "Repeated fields, one JSON list, or one comma-separated string.",
                            },
                            "templates": {"type": "string", "description": "Preset name or a JSON list."},
                            "top_k": {"type": "integer"},
                        },
                    }
                },
            },
        }
    },
)
async def classify(request: Request, p: Pipeline = Depends(pipeline)) -> schemas.ClassifyResponse:
    start = time.perf_counter()
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        blobs, params, labels, templates, top_k = await _multipart(request, p)
    elif content_type.startswith("application/json") or not content_type:
        body: schemas.ClassifyRequest = _parse(schemas.ClassifyRequest, await request.body())
        p.check_image_count(len(body.images))
        blobs, params = _base64_images(body.images, [f"images[{i}]" for i in range(len(body.images))])
        labels, templates, top_k = body.labels, body.templates, body.top_k
    else:
        raise UnsupportedMediaType(f"content type {content_type}; send application/json or multipart/form-data")
    result = await serve(request, p.classify(blobs, params, labels, templates, top_k))
    return _classification_response(p, result, (time.perf_counter() - start) * 1000)


# ---------------------------------------------------------------------------------------------------- /embed


@api.post("/embed", response_model=schemas.EmbedResponse, summary="L2-normalised image and/or text embeddings")
async def embed(request: Request, body: schemas.EmbedRequest, p: Pipeline = Depends(pipeline)) -> schemas.EmbedResponse:
    if not body.images and not body.texts:
        raise InvalidInput("give images, texts or both", param="images")

    async def work() -> schemas.EmbedResponse:
        image_vectors = text_vectors = None
        if body.images:
            p.check_image_count(len(body.images))
            blobs, params = _base64_images(body.images, [f"images[{i}]" for i in range(len(body.images))])
            image_vectors = _encode(await p.embed_images(blobs, params, p.deadline()), body.encoding_format)
        if body.texts:
            if body.templates is not None:
                texts = p.check_labels(body.texts, "texts")
                vectors = await p.label_matrix(texts, p.resolve_templates(body.templates))
            else:
                vectors = await p.encode_prompts(_check_texts(p, body.texts, "texts"))
            text_vectors = _encode(vectors, body.encoding_format)
        return schemas.EmbedResponse(
            model=p.model.name, dim=p.model.manifest.embed_dim, images=image_vectors, texts=text_vectors
        )

    return await serve(request, work())


def _check_texts(p: Pipeline, texts: list[str], param: str) -> list[str]:
    if len(texts) > p.settings.max_texts:
        raise InvalidInput(f"{len(texts)} texts; the limit is {p.settings.max_texts}", param=param)
    for i, text in enumerate(texts):
        # CLIP reads at most a few dozen tokens; a megabyte of text only costs tokenizer time.
        if len(text) > p.settings.max_text_chars and not is_image_data_url(text):
            raise InvalidInput(
                f"{param}[{i}] has {len(text):,} characters; the limit is {p.settings.max_text_chars:,}",
                param=f"{param}[{i}]",
            )
    return texts


# ------------------------------------------------------------------------------------------ OpenAI-compatible


@api.post("/v1/embeddings", response_model=schemas.OpenAIEmbeddingsResponse, summary="OpenAI-compatible embeddings")
async def openai_embeddings(
    request: Request, body: schemas.OpenAIEmbeddingsRequest, p: Pipeline = Depends(pipeline)
) -> schemas.OpenAIEmbeddingsResponse:
    if body.model is not None and body.model != p.model.name:
        raise NotFound(f"model {body.model!r} is not served here; this server serves {p.model.name!r}", param="model")
    if body.dimensions is not None and body.dimensions != p.model.manifest.embed_dim:
        raise InvalidInput(f"this model's embeddings have {p.model.manifest.embed_dim} dimensions", param="dimensions")
    inputs = [body.input] if isinstance(body.input, str) else body.input
    if not inputs:
        raise InvalidInput("input must not be empty", param="input")
    _check_texts(p, inputs, "input")
    image_rows = [i for i, item in enumerate(inputs) if is_image_data_url(item)]
    text_rows = [i for i, item in enumerate(inputs) if not is_image_data_url(item)]

    async def work() -> np.ndarray:
        vectors = np.zeros((len(inputs), p.model.manifest.embed_dim), np.float32)
        if image_rows:
            p.check_image_count(len(image_rows), "input")
            blobs, params = _base64_images([inputs[i] for i in image_rows], [f"input[{i}]" for i in image_rows])
            vectors[image_rows] = await p.embed_images(blobs, params, p.deadline())
        if text_rows:
            vectors[text_rows] = await p.encode_prompts([inputs[i] for i in text_rows])
        return vectors

    vectors = await serve(request, work())
    tokens = await asyncio.get_running_loop().run_in_executor(
        p.decode_pool, lambda: sum(len(p.model.tokenizer.encode(inputs[i])) + 2 for i in text_rows)
    )
    data = [schemas.OpenAIEmbedding(index=i, embedding=e) for i, e in enumerate(_encode(vectors, body.encoding_format))]
    return schemas.OpenAIEmbeddingsResponse(
        data=data, model=p.model.name, usage=schemas.OpenAIUsage(prompt_tokens=tokens, total_tokens=tokens)
    )


@api.get("/v1/models", response_model=schemas.ModelList, summary="The served model")
async def models(p: Pipeline = Depends(pipeline)) -> schemas.ModelList:
    manifest = p.model.manifest
    card = schemas.ModelCard(
        id=manifest.name,
        embed_dim=manifest.embed_dim,
        image_size=manifest.preprocess.image_size,
        context_length=manifest.tokenizer.context_length,
        activation=manifest.activation,
        engine=p.engines.image.description,
        content_hash=p.model.content_hash,
        source=manifest.source.model_dump(mode="json"),
    )
    return schemas.ModelList(data=[card])


# ---------------------------------------------------------------------------------------------------- probes


@probes.get("/healthz", summary="Alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@probes.get("/readyz", summary="Engines loaded and warm", responses={503: {"model": schemas.ErrorResponse}})
async def readyz(request: Request) -> JSONResponse:
    p = pipeline(request)
    return JSONResponse({"status": "ready", "model": p.model.name, "engine": p.engines.image.description})


@probes.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@probes.get("/", include_in_schema=False, response_class=HTMLResponse)
async def playground(request: Request) -> HTMLResponse:
    if not request.app.state.settings.playground:
        raise NotFound("nothing here; the API is under /classify, /embed, /v1/*; docs at /docs")
    from service.playground import PAGE

    return HTMLResponse(PAGE)
