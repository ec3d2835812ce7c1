"""Errors as HTTP responses: one JSON shape, a status per failure kind, never a 500 for bad input.

Every error body is ``{"error": {"type": ..., "message": ...}}``; the message says how to fix it.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from rmserve.batching.batcher import BatchFailed, Closed, Overloaded, RequestTooLarge
from rmserve.models.inputs import InputError
from rmserve.scoring.registry import UnknownModel

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with its HTTP status, kind and extra headers."""

    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.headers = headers or {}


class ClientDisconnected(Exception):
    """The client hung up before its response was ready (answered 499, which nobody reads)."""


def error_response(
    status: int, type_: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)


def from_domain(exc: Exception) -> ApiError:
    """Map an error of the scoring path to its HTTP form (unknown errors become 500)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InputError):
        return ApiError(422, "invalid_input", str(exc))
    if isinstance(exc, UnknownModel):
        return ApiError(404, "model_not_found", str(exc))
    if isinstance(exc, RequestTooLarge):
        return ApiError(413, "request_too_large", str(exc))
    if isinstance(exc, Overloaded):
        return ApiError(429, "overloaded", str(exc), {"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, Closed):
        return ApiError(503, "shutting_down", str(exc), {"Retry-After": "1"})
    if isinstance(exc, BatchFailed):
        return ApiError(500, "scoring_failed", str(exc))
    log.exception("unexpected error", exc_info=exc)
    return ApiError(500, "internal_error", f"internal error ({type(exc).__name__}); see the server log.")


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if part == "body":
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def install_error_handlers(app: FastAPI) -> None:
    """Make every error, including FastAPI's own, answer in the common JSON shape."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.type, exc.message, exc.headers)

    @app.exception_handler(ClientDisconnected)
    async def _disconnected(_: Request, __: ClientDisconnected) -> Response:
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors()[:10]:
            loc = _location(tuple(err.get("loc", ())))
            # a failed union member repeats its tag in the location; drop it for readability
            problems.append(f"{loc}: {err.get('msg', 'invalid')}")
        message = "invalid request: " + "; ".join(problems)
        if any(err.get("type") == "json_invalid" for err in exc.errors()):
            message += " (send a JSON body with Content-Type: application/json)"
        return error_response(422, "invalid_request", message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 404:
            message = (
                "no such route; the API is POST /v1/score, GET /v1/models, /health, /ready, /metrics, and the "
                "trainers' POST /get_reward (OpenRLHF), /classify and /pooling (vLLM, verl) and /v1/embeddings "
                "(SGLang, verl)."
            )
        return error_response(exc.status_code, kind, message, dict(exc.headers or {}))
