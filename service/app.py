"""The FastAPI application factory; the lifespan owns the model, engines, batchers and label cache.

Startup loads the manifest (verifying every artifact's sha256), builds and warms the engines, starts the
batchers and connects the cache; only then does /readyz answer 200. Shutdown undoes it in reverse, in
`finally`, so a failed start leaves nothing running.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service import errors, routes, schemas
from service.admission import AdmissionMiddleware, Drain
from service.engines.factory import EnginePair, build_engines, warm_up
from service.metrics import Metrics
from service.middleware import BodyLimitMiddleware, MetricsMiddleware
from service.model import ServedModel
from service.pipeline import Pipeline
from service.request_log import RequestLogMiddleware
from service.settings import Settings

log = logging.getLogger("clipserve")


def _load(settings: Settings) -> tuple[ServedModel, EnginePair]:
    model = ServedModel.load(settings)
    engines = build_engines(settings, model.manifest, model.directory)
    warm_up(engines, model.manifest)
    return model, engines


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    # Loading and warming run blocking ONNX Runtime calls: keep them off the event loop.
    model, engines = await asyncio.to_thread(_load, settings)
    pipeline = Pipeline(settings, model, engines, metrics)
    try:
        await pipeline.start()
        metrics.engine_info.info(
            {"model": model.name, "engine": pipeline.engines.image.description, "content_hash": model.content_hash}
        )
        app.state.pipeline = pipeline
        log.info(
            "serving %s with %s, similarity on %s",
            model.name,
            pipeline.engines.image.description,
            pipeline.similarity_backend,
        )
        yield
    finally:
        # Whatever stops the server (SIGINT, an embedding server's should_exit), requests that still arrive get a
        # 503 with Retry-After, not a pipeline being torn down under them.
        app.state.drain.begin()
        app.state.pipeline = None
        await pipeline.stop()  # cancels saved classifiers' preparation first
        engines.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(
        title="clipserve",
        summary="Zero-shot image classification with CLIP: rank any labels for an image, no training.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.pipeline = None
    app.state.drain = Drain(settings.shutdown_grace_s)
    errors.install(app)
    app.include_router(routes.probes)
    app.include_router(routes.api)
    # The published schema states this app's own limits (its settings) and, once loaded, its model.
    app.openapi = partial(schemas.openapi, app)  # type: ignore[method-assign]
    # Innermost first: each add_middleware wraps everything added before it.
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        linger_bytes=int(settings.body_linger_mb * 1024 * 1024),
        linger_s=settings.body_linger_s,
    )
    # Outside the body limit, so a refused request's body is never read; inside the metrics, so refusals count.
    app.add_middleware(AdmissionMiddleware, drain=app.state.drain, max_concurrent=settings.max_concurrent_requests)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    if settings.cors_origins:  # off unless configured: a browser on another origin gets no access by default
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-API-Key", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    # Added last, so outermost: every answer, the ones the layers above refuse included, carries the request id.
    app.add_middleware(RequestLogMiddleware)
    return app
