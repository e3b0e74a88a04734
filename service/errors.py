"""The one error shape, `{"error": {"code", "message", "param", "request_id"}}`, and where exceptions become HTTP.

Domain code raises a `ServiceError` subclass (its status and code are class attributes); `install` maps
those, request-validation errors and unknown routes to that shape. Anything unexpected is caught by
`service.request_log.RequestLogMiddleware`, logged with its traceback and answered with a generic 500 in the
same shape: no traceback reaches a client.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service import request_context

log = logging.getLogger("clipserve.errors")


class ServiceError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.headers = message, param, headers


class InvalidRequest(ServiceError):
    status, code = 400, "invalid_request"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class InvalidInput(ServiceError):
    """Well-formed request whose content cannot be served (undecodable image, empty label, bad template)."""

    status, code = 422, "invalid_input"


class ClassifierNotFound(ServiceError):
    status, code = 404, "classifier_not_found"


class ClassifierNotReady(ServiceError):
    status, code = 409, "classifier_not_ready"


class ClassifierFailed(ServiceError):
    """Its preparation failed on this replica (the text engine did); PUT the same definition again to retry."""

    status, code = 503, "classifier_failed"


class StoreUnavailable(ServiceError):
    status, code = 503, "store_unavailable"


class Overloaded(ServiceError):
    status, code = 503, "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1, param: str | None = None) -> None:
        super().__init__(message, param=param, headers={"Retry-After": str(retry_after_s)})


class NotReady(ServiceError):
    status, code = 503, "not_ready"


class ClientClosedRequest(ServiceError):
    """Not an answer anyone reads: it only labels the request in logs and metrics."""

    status, code = 499, "client_closed_request"


class DeadlineExceeded(ServiceError):
    status, code = 504, "deadline_exceeded"


def error_body(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    # The request id lets a user's bug report be matched to the server's log line for that request.
    return {"error": {"code": code, "message": message, "param": param, "request_id": request_context.current_id()}}


def error_response(error: ServiceError) -> JSONResponse:
    return JSONResponse(error_body(error.code, error.message, error.param), error.status, headers=error.headers)


def _validation_param(location: tuple[Any, ...]) -> str | None:
    # ("body", "labels", 3) -> "labels[3]"; the leading "body"/"query" says where, not what.
    parts = [str(p) for p in location[1:]] if location and location[0] in ("body", "query", "path") else []
    param = ""
    for part in parts:
        param += f"[{part}]" if part.isdigit() else (f".{part}" if param else part)
    return param or None


def install(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, error: ServiceError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"msg": "invalid request", "loc": ()}
        param = _validation_param(tuple(first.get("loc", ())))
        message = str(first.get("msg", "invalid request"))
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body("invalid_request", f"body is not valid JSON: {message}"), 400)
        return JSONResponse(error_body("invalid_input", f"{param or 'request'}: {message}", param), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if isinstance(error.__cause__, ServiceError):  # FastAPI wraps errors raised while reading the body
            return error_response(error.__cause__)
        code = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}.get(
            error.status_code, "http_error"
        )
        headers = dict(error.headers or {})
        if error.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return JSONResponse(error_body(code, str(error.detail)), error.status_code, headers=headers)


def _allowed_methods(request: Request) -> list[str]:
    # Starlette's 405 names the methods of the first route whose path matched; a path served by several routes
    # (GET, PUT and DELETE /v1/classifiers/{name}) takes all of theirs.
    methods: set[str] = set()
    for route in _leaf_routes(request.app.routes):
        match, _ = route.matches({**request.scope, "method": "OPTIONS"})
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def _leaf_routes(routes: list[Any]) -> list[Any]:
    # FastAPI keeps an included router as one entry (its routers here carry no prefix): look inside it.
    leaves = []
    for route in routes:
        inner = getattr(getattr(route, "original_router", None), "routes", None)
        leaves += _leaf_routes(inner) if inner is not None else [route]
    return leaves
