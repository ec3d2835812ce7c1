"""The app factory and its lifespan: load models (in the background), start batchers, drain on exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

from fastapi import FastAPI

from rmserve import __version__
from rmserve.api.errors import install_error_handlers
from rmserve.api.middleware import ApiKeyMiddleware, RequestContextMiddleware
from rmserve.api.openrlhf import router as openrlhf_router
from rmserve.api.routes import router
from rmserve.api.runs import router as runs_router
from rmserve.api.sglang import router as sglang_router
from rmserve.api.state import AppState
from rmserve.api.vllm import router as vllm_router
from rmserve.config import ModelSpec, Settings
from rmserve.metrics import Metrics
from rmserve.models.base import RewardModel
from rmserve.monitor import RunMonitor
from rmserve.scoring.loading import load_models, plan_loading
from rmserve.scoring.registry import ModelRegistry

log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    *,
    models: Sequence[RewardModel] | None = None,
    specs: Sequence[ModelSpec] | None = None,
) -> FastAPI:
    """Build the app.

    Args:
        settings: server settings.
        models: already loaded models to serve (tests, embedding); when ``None`` the models the
            settings name are loaded in the background at startup, ``/ready`` answering 503 until done.
        specs: per-model settings of ``models`` (limits, reward, lambdas), one per model.
    """
    metrics = Metrics()
    monitor = RunMonitor(
        window=settings.monitor_window,
        max_runs=settings.monitor_max_runs,
        max_windows=settings.monitor_max_windows,
        baseline_windows=settings.monitor_baseline_windows,
        reference_p99={
            m.name: m.reference_p99
            for m in (specs or settings.served_models())
            if m.reference_p99 is not None
        },
        on_window=metrics.run_window,
        on_evict=metrics.run_evicted,
    )
    state = AppState(settings=settings, metrics=metrics, monitor=monitor)

    def serve(loaded: Sequence[RewardModel], specs: Sequence[ModelSpec] | None) -> None:
        registry = ModelRegistry.from_models(
            loaded, settings, specs=specs, observer_for=state.metrics.observer
        )
        registry.start()
        for served in registry.models.values():
            state.metrics.model_weights.labels(served.name).set(served.info.weights_bytes)
            if served.info.memory_estimate_bytes is not None:
                state.metrics.model_memory_estimate.labels(served.name).set(served.info.memory_estimate_bytes)
        state.registry = registry

    async def load_in_background() -> None:
        try:  # a plan over budget fails here, before any model is loaded: nothing is served half-loaded
            plan = await asyncio.to_thread(plan_loading, settings)
            for device in plan.memory.devices:
                state.metrics.device_memory_budget.labels(device.device).set(device.budget_bytes)
            loaded, specs = await asyncio.to_thread(load_models, settings, plan)
            serve(loaded, specs)
            log.info("ready: serving %s", ", ".join(state.registry.models) if state.registry else "")
        except Exception as exc:
            state.load_error = f"{type(exc).__name__}: {exc}"
            log.error("model loading failed: %s", state.load_error)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = None
        if models is not None:
            serve(models, specs)
        else:
            loader = asyncio.create_task(load_in_background())
        try:
            yield
        finally:
            state.shutting_down = True
            if loader is not None and not loader.done():
                await asyncio.gather(loader, return_exceptions=True)  # a thread cannot be interrupted
            if state.registry is not None:
                await state.registry.close(settings.shutdown_timeout_s)

    app = FastAPI(
        title="rmserve",
        version=__version__,
        summary="Reward-model inference server for RLHF.",
        lifespan=lifespan,
    )
    app.state.rmserve = state
    app.include_router(router)
    app.include_router(openrlhf_router)
    app.include_router(vllm_router)
    app.include_router(sglang_router)
    app.include_router(runs_router)
    install_error_handlers(app)
    keys = settings.api_keys()  # none: authentication off (the middleware then only refuses /key/ paths)
    # inside the request context: a 401 still gets a request id and is counted
    app.add_middleware(ApiKeyMiddleware, keys=tuple(k.encode() for k in keys))
    app.add_middleware(
        RequestContextMiddleware, metrics=state.metrics, max_request_bytes=settings.max_request_bytes
    )
    return app
