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

from fastapi import FastAPI

from service import errors, routes
from service.engines.factory import EnginePair, build_engines, warm_up
from service.metrics import Metrics
from service.middleware import BodyLimitMiddleware, MetricsMiddleware
from service.model import ServedModel
from service.pipeline import Pipeline
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
        app.state.pipeline = None
        await pipeline.stop()
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
    errors.install(app)
    app.include_router(routes.probes)
    app.include_router(routes.api)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app
