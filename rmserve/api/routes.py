"""HTTP routes: validate, hand the work to the served model, map errors. No logic of their own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from rmserve.aggregation import AGGREGATES, AggregationParams
from rmserve.api.errors import ApiError, from_domain
from rmserve.api.schemas import (
    ErrorResponse,
    ModelCard,
    ModelList,
    ScoreRequest,
    ScoreResponse,
    Status,
    Usage,
)
from rmserve.api.state import AppState
from rmserve.config import Settings
from rmserve.serving import ModelRegistry

T = TypeVar("T")

router = APIRouter()

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        404: "Unknown model.",
        413: "Request body, input count or token total over the limits.",
        422: "Invalid input (message says which and how to fix it).",
        429: "Queue full; retry after Retry-After seconds.",
        500: "The batch holding the request failed.",
        503: "Models still loading, or the server is shutting down.",
        504: "Not answered within request_timeout_s; the request was cancelled.",
    }.items()
}


class ClientDisconnected(Exception):
    """The client hung up before its response was ready."""


def _state(request: Request) -> AppState:
    return request.app.state.rmserve


def settings_of(request: Request) -> Settings:
    """The server's settings."""
    return _state(request).settings


def registry_of(request: Request) -> ModelRegistry:
    state = _state(request)
    if state.shutting_down:
        raise ApiError(
            503,
            "shutting_down",
            "the server is shutting down; retry on another replica.",
            {"Retry-After": "1"},
        )
    if state.registry is None:
        detail = (
            f"model loading failed: {state.load_error}" if state.load_error else "models are still loading"
        )
        raise ApiError(
            503, "not_ready", f"{detail}; GET /ready says when the server can score.", {"Retry-After": "5"}
        )
    return state.registry


def check_input_count(request: Request, count: int) -> None:
    """Refuse (413) a request with more inputs than ``max_inputs_per_request``."""
    limit = settings_of(request).max_inputs_per_request
    if count > limit:
        raise ApiError(
            413,
            "too_many_inputs",
            f"the request has {count} inputs, over the limit of {limit}; split it into several requests.",
        )


async def until_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work``, cancelling it if the client disconnects first or the request timeout passes.

    Cancelled work's queued inputs are dropped before they are computed.

    Raises:
        ClientDisconnected: the client hung up.
        ApiError: 504 once ``request_timeout_s`` has passed.
    """
    task = asyncio.ensure_future(work)

    async def wait_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    timeout = settings_of(request).request_timeout_s
    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        await asyncio.wait({task, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if watcher.done() and not watcher.cancelled():
            raise ClientDisconnected
        raise ApiError(
            504,
            "timeout",
            f"the request was not answered within request_timeout_s={timeout:g} s and was cancelled (its queued "
            "inputs dropped); send fewer inputs per request, add replicas, or raise --request-timeout-s.",
        )
    return task.result()


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


@router.post("/v1/score", response_model=ScoreResponse, responses=ERROR_RESPONSES)
async def score(body: ScoreRequest, request: Request, response: Response) -> ScoreResponse | Response:
    """Score inputs with a reward model; rewards come back in input order."""
    started = time.perf_counter()
    registry = registry_of(request)
    try:
        served = registry.get(body.model)
        request.scope["state"]["model"] = served.name
        check_input_count(request, len(body.inputs))
        defaults = served.info.defaults
        params = AggregationParams(
            uwo_lambda=defaults.uwo_lambda if body.uwo_lambda is None else body.uwo_lambda,
            tradeoff_lambda=defaults.tradeoff_lambda
            if body.tradeoff_lambda is None
            else body.tradeoff_lambda,
        )
        work = served.score(
            body.inputs,
            body.truncation,
            params=params,
            aggregates=list(dict.fromkeys(body.aggregates)),
            return_heads=body.return_heads,
        )
        outcome = await until_disconnect(request, work)
        request.scope["state"]["input_tokens"] = outcome.input_tokens
    except ClientDisconnected:
        return Response(status_code=499)
    except Exception as exc:
        raise from_domain(exc) from exc
    response.headers["x-tokenization-time"] = _ms(outcome.tokenize_s)
    response.headers["x-queue-time"] = _ms(outcome.queue_s)
    response.headers["x-inference-time"] = _ms(outcome.inference_s)
    response.headers["x-total-time"] = _ms(time.perf_counter() - started)
    return ScoreResponse(
        model=outcome.model,
        reward=served.info.reward,
        rewards=outcome.rewards,
        aggregates=outcome.aggregates,  # type: ignore[arg-type]
        heads=outcome.heads,
        head_std=outcome.head_std,
        truncated=outcome.truncated,
        usage=Usage(input_tokens=outcome.input_tokens),
    )


@router.get("/v1/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    """The served models: kind, dtype, device, limits, heads, aggregates and their defaults."""
    registry = registry_of(request)
    return ModelList(
        data=[
            ModelCard(
                id=m.info.name,
                aliases=list(registry.aliases[m.name]),
                kind=m.info.kind,
                architecture=m.info.architecture,
                dtype=m.info.dtype,
                device=m.info.device,
                max_length=m.info.max_length,
                parameters=m.info.parameters,
                weights_bytes=m.info.weights_bytes,
                memory_estimate_bytes=m.info.memory_estimate_bytes,
                quantize=m.info.quantize,
                pooling=m.info.pooling,
                default=m.name == registry.default,
                heads=list(m.info.heads),
                head_std=m.info.has_std,
                nominal=m.info.nominal,
                reward=m.info.reward,
                aggregates=list(AGGREGATES),
                uwo_lambda=m.info.defaults.uwo_lambda,
                tradeoff_lambda=m.info.defaults.tradeoff_lambda,
            )
            for m in registry.models.values()
        ]
    )


@router.get("/health", response_model=Status, responses={503: {"model": Status}})
async def health(request: Request) -> Status | JSONResponse:
    """Liveness: 200 while the process is sound, 503 if its models failed to load."""
    state = _state(request)
    if state.load_error:
        return JSONResponse({"status": "failed", "detail": state.load_error}, status_code=503)
    return Status(status="ok")


@router.get("/ready", response_model=Status, responses={503: {"model": Status}})
async def ready(request: Request) -> Status | JSONResponse:
    """Readiness: 200 once every model is loaded and until shutdown begins, else 503."""
    state = _state(request)
    if state.shutting_down:
        return JSONResponse({"status": "shutting_down"}, status_code=503, headers={"Retry-After": "1"})
    if state.registry is None:
        status = "failed" if state.load_error else "loading"
        return JSONResponse(
            {"status": status, "detail": state.load_error}, status_code=503, headers={"Retry-After": "5"}
        )
    return Status(status="ready")


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus metrics (text exposition format)."""
    return Response(_state(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
