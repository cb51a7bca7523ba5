"""Typed errors to HTTP status codes and OpenAI-shaped bodies, in one place."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from idlegrid.errors import (
    AuthError,
    Conflict,
    EngineError,
    Gone,
    IdlegridError,
    InsufficientCredits,
    InvalidRequest,
    ModelNotFound,
    NoCapacity,
    NotFound,
    PriceCapBelowOffers,
    RateLimited,
    SpendCapReached,
)

log = logging.getLogger("idlegrid.http")

# (status, OpenAI error type), most specific class first.
STATUS: list[tuple[type[IdlegridError], int, str]] = [
    (InvalidRequest, 400, "invalid_request_error"),
    (AuthError, 401, "authentication_error"),
    (InsufficientCredits, 402, "insufficient_quota"),
    (RateLimited, 429, "rate_limit_error"),
    (SpendCapReached, 429, "insufficient_quota"),
    (ModelNotFound, 404, "invalid_request_error"),
    (NotFound, 404, "invalid_request_error"),
    (Conflict, 409, "conflict_error"),
    (Gone, 410, "invalid_request_error"),
    (PriceCapBelowOffers, 400, "invalid_request_error"),  # before NoCapacity: a subclass
    (NoCapacity, 503, "service_unavailable"),
    (EngineError, 502, "engine_error"),
]


def error_body(
    message: str,
    type_: str,
    code: str | None,
    param: str | None = None,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The OpenAI error envelope (plus our typed data)."""
    return {
        "error": {
            "message": message,
            "type": type_,
            "param": param,
            "code": code,
            "data": data or {},
        }
    }


def status_for(exc: IdlegridError) -> tuple[int, str]:
    """HTTP status and OpenAI error type for a typed error."""
    for cls, status, type_ in STATUS:
        if isinstance(exc, cls):
            return status, type_
    return 500, "server_error"


def to_response(exc: IdlegridError) -> JSONResponse:
    """A JSON error response for a typed error."""
    status, type_ = status_for(exc)
    if status >= 500:
        log.error("%s: %s", exc.code, exc.message)
    param = exc.data.get("param") if isinstance(exc.data.get("param"), str) else None
    safe = json.loads(json.dumps(exc.data, default=str))
    response = JSONResponse(
        error_body(exc.message, type_, exc.code, param, safe), status_code=status
    )
    if isinstance(exc, RateLimited):  # as OpenAI does: whole seconds, rounded up
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.data["retry_after_s"])))
    return response


def install(app: FastAPI) -> None:
    """Register the handlers on an app."""

    @app.exception_handler(IdlegridError)
    async def _typed(_: Request, exc: IdlegridError) -> JSONResponse:
        return to_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            message, param = "request body is not valid JSON", None
        else:
            param = ".".join(loc) or None
            message = f"{param or 'body'}: {first.get('msg', 'invalid')}"
        return JSONResponse(
            error_body(message, "invalid_request_error", "invalid_request", param), status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            error_body(str(exc.detail), "invalid_request_error", code), status_code=exc.status_code
        )
