"""rmserve's own routes: ``/v1/score``, ``/v1/models``, ``/health``, ``/ready``, ``/metrics``.

Validate, hand the work to the served model (``api.deps``), answer. No logic of their own.
"""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from rmserve.aggregation import AggregationParams
from rmserve.api.deps import ERROR_RESPONSES, app_state, registry_of, resolve_model, score_request
from rmserve.api.schemas import MAX_SEED, ModelCard, ModelList, ScoreRequest, ScoreResponse, Status, Usage
from rmserve.names import AGGREGATES

router = APIRouter()


@router.post("/v1/score", response_model=ScoreResponse, responses=ERROR_RESPONSES)
async def score(body: ScoreRequest, request: Request, response: Response) -> ScoreResponse:
    """Score inputs with a reward model; rewards come back in input order."""
    served = resolve_model(request, body.model)
    defaults = served.info.defaults
    params = AggregationParams(
        uwo_lambda=defaults.uwo_lambda if body.uwo_lambda is None else body.uwo_lambda,
        tradeoff_lambda=defaults.tradeoff_lambda if body.tradeoff_lambda is None else body.tradeoff_lambda,
    )
    seed = body.brme_seed
    if body.brme_sample and seed is None:
        seed = secrets.randbelow(MAX_SEED + 1)
    outcome = await score_request(
        request,
        response,
        served,
        body.inputs,
        truncation=body.truncation,
        params=params,
        aggregates=list(dict.fromkeys(body.aggregates)),
        return_heads=body.return_heads,
        tradeoff_scope=body.tradeoff_scope,
        sample_seed=seed,
        run=body.run,
        normalize=body.normalize,
    )
    return ScoreResponse(
        model=outcome.model,
        reward=served.info.reward,
        rewards=outcome.rewards,
        aggregates=outcome.aggregates,
        heads=outcome.heads,
        head_std=outcome.head_std,
        categories=outcome.categories,
        truncated=outcome.truncated,
        brme_seed=seed,
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
                compiled=m.info.compiled,
                default=m.name == registry.default,
                heads=list(m.info.heads),
                head_std=m.info.has_std,
                nominal=m.info.nominal,
                reward=m.info.reward,
                categories=list(m.info.categories),
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
    state = app_state(request)
    if state.load_error:
        return JSONResponse({"status": "failed", "detail": state.load_error}, status_code=503)
    return Status(status="ok")


@router.get("/ready", response_model=Status, responses={503: {"model": Status}})
async def ready(request: Request) -> Status | JSONResponse:
    """Readiness: 200 once every model is loaded and until shutdown begins, else 503."""
    state = app_state(request)
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
    return Response(
        app_state(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
    )
