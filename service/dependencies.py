"""What the API routes depend on before their own work: the ready pipeline and an authorised caller."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from fastapi import Request

from service.errors import NotReady, Unauthorized
from service.pipeline import Pipeline


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
