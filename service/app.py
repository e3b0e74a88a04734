"""The FastAPI application factory.

Only liveness and readiness exist so far: the engines, /classify and /embed arrive with the service issue,
once the export step writes ONNX graphs for the demo model. Until then /readyz says why it is not ready.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse

NOT_READY = {
    "error": {
        "code": "not_ready",
        "message": "no model engine is loaded yet: serving arrives with the ONNX export and the service issues",
        "param": None,
    }
}


def create_app() -> FastAPI:
    app = FastAPI(title="clipserve", summary="Zero-shot image classification with CLIP.")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        return JSONResponse(NOT_READY, status_code=503)

    return app
