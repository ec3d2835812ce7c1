"""What every scoring route shares: the model lookup, the limits, cancellation and the timing headers.

``resolve_model`` finds the request's model (404 if none); ``score_request`` scores inputs through it
with the request's limits (413), cancelling the work when the client hangs up (499) or the request
times out (504), maps every domain error to its HTTP form, and sets the timing headers every scoring
route answers with:

- ``x-tokenization-time``: milliseconds spent tokenising the request's inputs;
- ``x-queue-time``: the longest wait of its inputs in the batcher's queue;
- ``x-inference-time``: the forward time of the batches that held its inputs;
- ``x-total-time``: from the model lookup to the answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from fastapi import Request, Response
from pydantic import ValidationError

from rmserve.api.errors import ApiError, ClientDisconnected, from_domain
from rmserve.api.schemas import ErrorResponse
from rmserve.api.state import AppState
from rmserve.config import Settings
from rmserve.models.inputs import INPUT_ADAPTER, RewardInput
from rmserve.monitor import Scored, check_run
from rmserve.scoring.registry import ModelRegistry
from rmserve.scoring.scorer import ScoreOutcome, ServedModel

T = TypeVar("T")
RUN_HEADER = "x-rmserve-run"
TIMING_HEADERS = ("x-tokenization-time", "x-queue-time", "x-inference-time", "x-total-time")

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


def app_state(request: Request) -> AppState:
    """What the app keeps between requests."""
    state: AppState = request.app.state.rmserve
    return state


def settings_of(request: Request) -> Settings:
    """The server's settings."""
    return app_state(request).settings


def registry_of(request: Request) -> ModelRegistry:
    state = app_state(request)
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
    """Run ``work`` in this request's task, cancelling it if the client disconnects first or the request
    timeout passes.

    Cancelled work's queued inputs are dropped before they are computed. One watcher task per request
    reads the connection and a timer handle keeps the timeout; the work runs in the request's own task.

    Raises:
        ClientDisconnected: the client hung up.
        ApiError: 504 once ``request_timeout_s`` has passed.
    """
    current = asyncio.current_task()
    assert current is not None, "until_disconnect runs inside a request's task"
    reason: list[str] = []  # why this function cancelled the request's task: "disconnect" or "timeout"

    def stop(why: str) -> None:
        if not reason:
            reason.append(why)
            current.cancel()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        stop("disconnect")

    timeout = settings_of(request).request_timeout_s
    watcher = asyncio.ensure_future(watch())
    timer = None if timeout is None else asyncio.get_running_loop().call_later(timeout, stop, "timeout")
    try:
        return await work
    except asyncio.CancelledError:
        if not reason:
            raise  # cancelled from outside (shutdown): not this request's doing
        uncancel = getattr(current, "uncancel", None)  # Python 3.11+: this cancellation is handled here
        if uncancel is not None:
            uncancel()
        if reason[0] == "disconnect":
            raise ClientDisconnected from None
        raise ApiError(
            504,
            "timeout",
            f"the request was not answered within request_timeout_s={timeout:g} s and was cancelled (its queued "
            "inputs dropped); send fewer inputs per request, add replicas, or raise --request-timeout-s.",
        ) from None
    finally:
        watcher.cancel()
        if timer is not None:
            timer.cancel()


def resolve_model(request: Request, name: str | None) -> ServedModel:
    """The served model a request names (None: the default), recorded for the access log and metrics.

    Raises:
        ApiError: 503 while loading or shutting down, 404 for a model not served here.
    """
    registry = registry_of(request)
    try:
        served = registry.get(name)
    except Exception as exc:
        raise from_domain(exc) from exc
    request.scope["state"]["model"] = served.name
    request.scope["state"]["started"] = time.perf_counter()
    return served


def _query_value(request: Request, name: str) -> str | None:
    """A query parameter's value, without parsing the query string when there is none (the common case)."""
    return request.query_params.get(name) if request.scope.get("query_string") else None


def _header_value(request: Request, name: bytes) -> str | None:
    """A request header's value (``name`` lower-case), read off the raw ASGI headers."""
    for key, value in request.scope.get("headers") or ():
        if key == name:
            return value.decode("latin-1")
    return None


def run_of(request: Request, body_run: str | None = None) -> str | None:
    """The run a request names: its body's ``run``, else the ``x-rmserve-run`` header, else the ``run`` query
    parameter (what a trainer that sends neither bodies of its own nor headers can set in its URL).

    Raises:
        ApiError: 422 for a malformed run name.
    """
    name = body_run or _header_value(request, RUN_HEADER.encode()) or _query_value(request, "run")
    if name is None:
        return None
    try:
        return check_run(name)
    except ValueError as exc:
        raise ApiError(422, "invalid_request", str(exc)) from None


def normalization_of(request: Request, body_normalize: str | None = None) -> str | None:
    """``run`` when the request asks for per-run normalisation (body ``normalize`` or ``?normalize=run``).

    Raises:
        ApiError: 422 for another value.
    """
    value = body_normalize or _query_value(request, "normalize")
    if value not in (None, "run"):
        raise ApiError(422, "invalid_request", f"normalize is {value!r}; the one normalisation is 'run'.")
    return value


def _monitor(request: Request, served: ServedModel, outcome: ScoreOutcome, run: str | None) -> None:
    monitor = app_state(request).monitor
    if run is None or not monitor.enabled:
        return
    heads = outcome.head_values or [[] for _ in outcome.rewards]
    sigmas: list[list[float] | None] = [None] * len(outcome.rewards)
    if outcome.head_sigmas is not None:
        sigmas = list(outcome.head_sigmas)
    lengths = outcome.input_lengths or [0 for _ in outcome.rewards]
    items = [
        Scored(reward, tokens, head, sigma)
        for reward, tokens, head, sigma in zip(outcome.rewards, lengths, heads, sigmas, strict=True)
    ]
    monitor.record(run, served.name, items)


async def score_request(
    request: Request,
    response: Response,
    served: ServedModel,
    inputs: list[RewardInput],
    *,
    run: str | None = None,
    normalize: str | None = None,
    **options: Any,
) -> ScoreOutcome:
    """Score ``inputs`` with ``served`` (``ServedModel.score`` options), setting the timing headers; the
    rewards go to the run monitor under the request's run (``run_of``), and with ``normalize="run"`` come
    back normalised by the run's running statistics.

    Raises:
        ClientDisconnected: the client hung up (answered 499).
        ApiError: the inputs are over a limit, invalid, or could not be scored; a bad run name or
            normalisation (422).
    """
    run = run_of(request, run)
    normalize = normalization_of(request, normalize)
    monitor = app_state(request).monitor
    if normalize == "run" and (run is None or not monitor.enabled):
        raise ApiError(
            422,
            "invalid_request",
            "normalize 'run' needs a run: name it (the run field, the x-rmserve-run header or ?run=) on a server "
            "whose run monitor is on (monitor_max_runs above 0)."
            if run is None
            else "normalize 'run' needs the run monitor, which is off on this server (monitor_max_runs is 0).",
        )
    try:
        check_input_count(request, len(inputs))
        outcome = await until_disconnect(request, served.score(inputs, **options))
    except ClientDisconnected:
        raise
    except Exception as exc:
        raise from_domain(exc) from exc
    request.scope["state"]["input_tokens"] = outcome.input_tokens
    set_timing_headers(request, response, outcome.tokenize_s, outcome.queue_s, outcome.inference_s)
    _monitor(request, served, outcome, run)
    if normalize == "run" and run is not None:
        outcome = dataclasses.replace(outcome, rewards=monitor.normalise(run, served.name, outcome.rewards))
    return outcome


def set_timing_headers(
    request: Request, response: Response, tokenize_s: float, queue_s: float, inference_s: float
) -> None:
    """The timing headers (``TIMING_HEADERS``), in milliseconds."""
    started = request.scope["state"].get("started", time.perf_counter())
    values = (tokenize_s, queue_s, inference_s, time.perf_counter() - started)
    for name, seconds in zip(TIMING_HEADERS, values, strict=True):
        response.headers[name] = f"{seconds * 1000:.2f}"


def build_inputs(field: str, raw: list[dict[str, Any]]) -> list[RewardInput]:
    """Reward inputs from their plain forms; a bad one is a 422 naming ``field[index]``."""
    out = []
    for index, item in enumerate(raw):
        try:
            out.append(INPUT_ADAPTER.validate_python(item))
        except ValidationError as exc:
            problem = exc.errors()[0]
            raise ApiError(
                422,
                "invalid_request",
                f"{field}[{index}]: {problem['msg']}; send a non-empty text or valid token ids.",
            ) from None
    return out
