"""HTTP routes. Each gets its checked input from a dependency (service/inputs.py), makes the request's one
deadline, hands the work to the pipeline under it, and shapes the answer."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service import playground as playground_files
from service import request_context, schemas
from service.admission import Draining
from service.classifiers.registry import Classifier
from service.classifiers.store import Definition
from service.deadline import Deadline
from service.dependencies import authorised, pipeline
from service.errors import ClassifierNotFound, ClientClosedRequest, DeadlineExceeded, NotFound
from service.inputs import (
    ClassifierInput,
    ClassifyInput,
    EmbeddingsInput,
    EmbedInput,
    ExamplesInput,
    classifier_input,
    classify_input,
    embed_input,
    embeddings_input,
    examples_input,
)
from service.pipeline import Classification, Pipeline
from service.schemas import request_body

T = TypeVar("T")
_DISCONNECT_POLL_S = 0.1
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": schemas.ErrorResponse} for status in (400, 401, 404, 409, 413, 415, 422, 503, 504)
}


api = APIRouter(dependencies=[Depends(authorised)], responses=_ERRORS)
probes = APIRouter()


async def serve(request: Request, deadline: Deadline, work: Awaitable[T]) -> T:
    """Runs `work` until the request's deadline, and stops it if the client goes away."""
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
        async with asyncio.timeout(deadline.remaining_s()):
            return await task
    except TimeoutError as error:
        raise DeadlineExceeded(f"no answer within {deadline.budget_s:g} s") from error
    except asyncio.CancelledError:
        if not disconnected:
            raise  # the server is shutting down: let the cancellation through
        # Nobody will read the answer; a plain status keeps the error-rate metrics honest (nginx's 499).
        raise ClientClosedRequest("the client closed the connection before the answer was ready") from None
    finally:
        watcher.cancel()
        task.cancel()


def _encode(vectors: np.ndarray, encoding_format: str) -> list[list[float] | str]:
    if encoding_format == "base64":
        return [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    return [v.tolist() for v in vectors.astype(np.float32)]


def _classification_response(p: Pipeline, result: Classification, total_ms: float) -> Response:
    """The ClassifyResponse document, written straight from the ranked arrays: building it as pydantic models (one
    LabelScore per label, validated, then serialised) took about 6 ms of a warm 1,000-label request here, plain
    lists and orjson about 1 ms. The route's response_model still documents it."""
    start = time.perf_counter()
    names = result.labels
    results = [
        {
            "labels": [
                {"label": names[c], "probability": probability, "score": score}
                for c, probability, score in zip(indices.tolist(), probabilities.tolist(), scores.tolist(), strict=True)
            ]
        }
        for indices, probabilities, scores in zip(
            result.ranked.indices, result.ranked.probabilities, result.ranked.cosines, strict=True
        )
    ]
    timing = {
        "total_ms": round(total_ms, 3),
        "images_ms": round(result.images_ms, 3),
        "labels_ms": round(result.labels_ms, 3),
        "similarity_ms": round(result.similarity_ms, 3),
    }
    document = {"model": p.model.name, "classifier": result.classifier, "results": results, "timing": timing}
    # orjson: json.dumps spent 6 ms on a 1,000-label answer's floats (their repr), orjson 0.3 ms; same numbers.
    response = Response(orjson.dumps(document), media_type="application/json")
    request_context.note_time("respond", (time.perf_counter() - start) * 1000)
    return response


# ------------------------------------------------------------------------------------------------- /classify


@api.post(
    "/classify",
    response_model=schemas.ClassifyResponse,
    summary="Rank labels for images, zero-shot",
    openapi_extra={"requestBody": request_body(schemas.ClassifyRequest, schemas.ClassifyForm)},
)
async def classify(
    request: Request, inputs: ClassifyInput = Depends(classify_input), p: Pipeline = Depends(pipeline)
) -> Response:
    start = time.perf_counter()
    deadline = Deadline.after(p.settings.request_timeout_s)
    result = await serve(request, deadline, p.classify(inputs, deadline))
    return _classification_response(p, result, (time.perf_counter() - start) * 1000)


# ---------------------------------------------------------------------------------------------------- /embed


@api.post(
    "/embed",
    response_model=schemas.EmbedResponse,
    summary="L2-normalised image and/or text embeddings",
    openapi_extra={"requestBody": request_body(schemas.EmbedRequest)},
)
async def embed(
    request: Request, inputs: EmbedInput = Depends(embed_input), p: Pipeline = Depends(pipeline)
) -> schemas.EmbedResponse:
    deadline = Deadline.after(p.settings.request_timeout_s)

    async def work() -> schemas.EmbedResponse:
        image_vectors = text_vectors = None
        if inputs.images:
            image_vectors = _encode(await p.encode_images(inputs.images, deadline), inputs.encoding_format)
        if inputs.texts:
            if inputs.templates is not None:
                vectors = await p.label_cache.label_matrix(inputs.texts, inputs.templates, deadline)
            else:
                vectors = await p.encode_texts(inputs.texts, deadline)
            text_vectors = _encode(vectors, inputs.encoding_format)
        return schemas.EmbedResponse(
            model=p.model.name, dim=p.model.manifest.embed_dim, images=image_vectors, texts=text_vectors
        )

    return await serve(request, deadline, work())


# ------------------------------------------------------------------------------------------ OpenAI-compatible


@api.post(
    "/v1/embeddings",
    response_model=schemas.OpenAIEmbeddingsResponse,
    summary="OpenAI-compatible embeddings",
    openapi_extra={"requestBody": request_body(schemas.OpenAIEmbeddingsRequest)},
)
async def openai_embeddings(
    request: Request, inputs: EmbeddingsInput = Depends(embeddings_input), p: Pipeline = Depends(pipeline)
) -> schemas.OpenAIEmbeddingsResponse:
    deadline = Deadline.after(p.settings.request_timeout_s)

    async def work() -> tuple[np.ndarray, int]:
        vectors = np.zeros((len(inputs.inputs), p.model.manifest.embed_dim), np.float32)
        tokens = 0
        if inputs.image_rows:
            vectors[inputs.image_rows] = await p.encode_images(inputs.images, deadline)
        if inputs.text_rows:
            texts = inputs.texts
            vectors[inputs.text_rows], tokens = await asyncio.gather(
                p.encode_texts(texts, deadline), p.encode_texts.count_tokens(texts)
            )
        return vectors, tokens

    vectors, tokens = await serve(request, deadline, work())
    encoded = _encode(vectors, inputs.encoding_format)
    data = [schemas.OpenAIEmbedding(index=i, embedding=e) for i, e in enumerate(encoded)]
    return schemas.OpenAIEmbeddingsResponse(
        data=data, model=p.model.name, usage=schemas.OpenAIUsage(prompt_tokens=tokens, total_tokens=tokens)
    )


# ----------------------------------------------------------------------------------------- saved classifiers


def _classifier_status(p: Pipeline, classifier: Classifier, *, with_labels: bool = False) -> schemas.ClassifierStatus:
    definition = classifier.definition
    return schemas.ClassifierStatus(
        name=definition.name,
        status=classifier.status,  # type: ignore[arg-type]
        label_count=len(definition.labels),
        templates=list(definition.templates),
        prompts_prepared=classifier.prompts_prepared,
        prompts_total=definition.prompts,
        eta_s=None if classifier.eta_s is None else round(classifier.eta_s, 1),
        model=p.model.name,
        content_hash=p.model.content_hash,
        error=classifier.error,
        examples_per_label=definition.examples_per_label(),
        labels=list(definition.labels) if with_labels else None,
    )


@api.put(
    "/v1/classifiers/{name}",
    response_model=schemas.ClassifierStatus,
    status_code=202,
    summary="Create or replace a saved classifier; its label vectors are prepared in the background",
    responses={201: {"model": schemas.ClassifierStatus, "description": "Every vector was already cached: ready."}},
    openapi_extra={"requestBody": request_body(schemas.ClassifierRequest)},
)
async def put_classifier(
    inputs: ClassifierInput = Depends(classifier_input), p: Pipeline = Depends(pipeline)
) -> JSONResponse:
    classifier, _ = await p.classifiers.put(Definition.new(inputs.name, inputs.labels, inputs.templates))
    body = _classifier_status(p, classifier).model_dump(mode="json")
    return JSONResponse(body, status_code=201 if classifier.status == "ready" else 202)


@api.get("/v1/classifiers", response_model=schemas.ClassifierList, summary="The saved classifiers")
async def list_classifiers(p: Pipeline = Depends(pipeline)) -> schemas.ClassifierList:
    found = [await p.classifiers.get(name, missing_ok=True) for name in await p.classifiers.names()]
    return schemas.ClassifierList(data=[_classifier_status(p, c) for c in found if c is not None])


@api.get("/v1/classifiers/{name}", response_model=schemas.ClassifierStatus, summary="One saved classifier")
async def get_classifier(name: str, p: Pipeline = Depends(pipeline)) -> schemas.ClassifierStatus:
    classifier = await p.classifiers.get(name)
    assert classifier is not None  # get raises for an unknown name
    return _classifier_status(p, classifier, with_labels=True)


@api.delete("/v1/classifiers/{name}", status_code=204, summary="Delete a saved classifier (and stop preparing it)")
async def delete_classifier(name: str, p: Pipeline = Depends(pipeline)) -> Response:
    if not await p.classifiers.delete(name):
        raise ClassifierNotFound(f"no classifier named {name!r}")
    return Response(status_code=204)


@api.post(
    "/v1/classifiers/{name}/examples",
    response_model=schemas.ClassifierStatus,
    summary="Add few-shot example images to one label of a saved classifier",
    openapi_extra={"requestBody": request_body(schemas.ExamplesRequest, schemas.ExamplesForm)},
)
async def add_examples(
    inputs: ExamplesInput = Depends(examples_input), p: Pipeline = Depends(pipeline)
) -> schemas.ClassifierStatus:
    deadline = Deadline.after(p.settings.request_timeout_s)
    classifier = await p.classifiers.add_examples(inputs.name, inputs.label, inputs.images, deadline)
    return _classifier_status(p, classifier)


@api.delete(
    "/v1/classifiers/{name}/examples",
    response_model=schemas.ClassifierStatus,
    summary="Remove a label's few-shot examples (?label=...), or all of them",
)
async def delete_examples(
    name: str, label: str | None = None, p: Pipeline = Depends(pipeline)
) -> schemas.ClassifierStatus:
    return _classifier_status(p, await p.classifiers.remove_examples(name, label))


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
    if request.app.state.drain.draining:  # first: a load balancer must stop sending before the socket closes
        raise Draining()
    p = pipeline(request)
    return JSONResponse({"status": "ready", "model": p.model.name, "engine": p.engines.image.description})


@probes.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


# ------------------------------------------------------------------------------------------------ playground


def _playground_file(request: Request, name: str) -> Response:
    """One of the playground's files, with its security headers; 404 unless CLIPSERVE_PLAYGROUND is on."""
    if not request.app.state.settings.playground:
        raise NotFound("nothing here; the API is under /classify, /embed, /v1/*; docs at /docs")
    try:
        content, media_type = playground_files.asset(name)
    except playground_files.UnknownAsset:
        raise NotFound(f"no playground file named {name!r}") from None
    return Response(content, media_type=media_type, headers=playground_files.HEADERS)


@probes.get("/", include_in_schema=False, response_class=HTMLResponse)
async def playground(request: Request) -> Response:
    return _playground_file(request, playground_files.PAGE)


@probes.get("/playground/{name}", include_in_schema=False)
async def playground_asset(request: Request, name: str) -> Response:
    if name == playground_files.PAGE:  # the page itself lives at /
        raise NotFound(f"no playground file named {name!r}")
    return _playground_file(request, name)
