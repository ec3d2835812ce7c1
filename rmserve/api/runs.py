"""The run monitor's routes: ``GET /v1/runs`` (one line a run) and ``GET /v1/runs/{run}`` (its series).

The signals and their windows are defined in ``rmserve.monitor``; these routes only read them.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from rmserve.api.deps import app_state
from rmserve.api.errors import ApiError
from rmserve.api.schemas import ErrorResponse
from rmserve.monitor import Window

router = APIRouter()


class RunModelLine(BaseModel):
    inputs: int = Field(description="Inputs scored for this run and model.")
    windows: int = Field(description="Windows closed so far.")


class RunLine(BaseModel):
    id: str
    created: float = Field(description="Unix time of the run's first request.")
    last_seen: float = Field(description="Unix time of its last request.")
    models: dict[str, RunModelLine]


class RunList(BaseModel):
    object: str = "list"
    window: int = Field(description="Inputs per window.")
    max_runs: int = Field(description="Runs kept (least recently used dropped first); 0: the monitor is off.")
    data: list[RunLine]


class OpenWindow(BaseModel):
    count: int
    since: float | None


class SeriesModel(BaseModel):
    inputs: int
    window: int
    reference_p99: float | None = Field(description="What saturation counts rewards above.")
    reference: str = Field(
        description="'model' (its reference_p99 setting) or 'baseline' (the run's first windows)."
    )
    baseline_windows: list[int]
    windows: list[Window]
    open: OpenWindow


class NormalizationModel(BaseModel):
    count: int
    mean: float
    std: float


class RunDetail(BaseModel):
    id: str
    created: float
    last_seen: float
    models: dict[str, SeriesModel]
    normalization: dict[str, NormalizationModel]


@router.get("/v1/runs", response_model=RunList)
async def runs(request: Request) -> RunList:
    """Every run the monitor keeps, most recently seen first."""
    monitor = app_state(request).monitor
    return RunList(
        window=monitor.window,
        max_runs=monitor.max_runs,
        data=[RunLine.model_validate(line) for line in monitor.runs()],
    )


@router.get(
    "/v1/runs/{run:path}",
    response_model=RunDetail,
    responses={404: {"model": ErrorResponse, "description": "Unknown run."}},
)
async def run_series(run: str, request: Request) -> RunDetail:
    """One run's time series, per model."""
    monitor = app_state(request).monitor
    series = monitor.series(run)
    if series is None:
        known = [line["id"] for line in monitor.runs()[:10]]
        raise ApiError(
            404,
            "run_not_found",
            f"no run {run[:140]!r} here (runs are named by the x-rmserve-run header, ?run= or a body's run field, "
            f"and the least recently used are dropped past {monitor.max_runs}); "
            + (f"recent runs: {', '.join(known)}." if known else "no run has been seen yet."),
        )
    return RunDetail.model_validate(series)
