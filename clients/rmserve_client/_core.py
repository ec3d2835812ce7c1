"""Everything the sync and async clients share that is not I/O.

Configuration checks, request bodies, chunking, the round robin over base URLs, retry decisions
and backoff, response parsing, and the reassembly of chunk results in input order. The two clients
only send requests, sleep, and run chunks concurrently (threads or tasks); every decision is here.

Retry policy (per request, i.e. per chunk):

- retried: transport errors (connect errors, timeouts, resets: ``httpx.TransportError``), 429,
  503, and the gateway errors 502 and 504 a proxy in front of replicas may answer; all of these
  are transient and scoring is idempotent, so a retry is safe;
- retried once: 500. The server batches inputs of many clients together and fails the whole batch
  when its forward pass fails, so a neighbour's input or a transient CUDA out-of-memory may be the
  cause; a second 500 means the failure follows this request, and it is raised (``ScoringFailed``);
- never retried: every other status (400, 401, 403, 404, 413, 422, ...): the same request would
  fail the same way;
- at most ``max_retries`` retries in all; each one goes to the next base URL.

Backoff before retry ``n`` (0-based) is full jitter, ``uniform(0, min(max_backoff, backoff * 2**n))``.
When the answer carries ``Retry-After`` (seconds or an HTTP date), the wait is
``min(retry_after, max_backoff) + jitter``: Retry-After is a floor the server asks for, and adding
the jitter (rather than taking the larger of the two) keeps clients that got the same Retry-After
from coming back in lock-step. Capping Retry-After at ``max_backoff`` keeps a misconfigured proxy
from stalling a training run for an hour; raise ``max_backoff`` to honour longer ones.
"""

from __future__ import annotations

import email.utils
import itertools
import json
import math
import random
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from rmserve_client._errors import (
    ChunkInfo,
    RewardClientError,
    connection_error,
    error_from_response,
)
from rmserve_client._inputs import JsonInput
from rmserve_client._models import ModelInfo, ModelListBody, RunBody, RunListBody, ScoreBody, ScoreResult

__version__ = "0.1.0"

SCORE_PATH = "/v1/score"
MODELS_PATH = "/v1/models"
RUNS_PATH = "/v1/runs"
RETRY_STATUSES = frozenset({429, 502, 503, 504})
RETRY_ONCE_STATUSES = frozenset({500})
TRUNCATIONS = ("left", "right", "error")
PROBE_TIMEOUT = 10.0
RUN_HEADER = "x-rmserve-run"
RUN_NAME = re.compile(r"[A-Za-z0-9._:/@+-]{1,128}")


@dataclass(frozen=True)
class Settings:
    """The checked constructor arguments of both clients."""

    base_urls: tuple[str, ...]
    api_key: str | None
    timeout: httpx.Timeout
    max_retries: int
    backoff: float
    max_backoff: float
    chunk_size: int
    max_concurrency: int
    model: str | None
    run: str | None = None

    @classmethod
    def create(
        cls,
        base_url: str | Sequence[str],
        *,
        api_key: str | None,
        timeout: float | httpx.Timeout,
        max_retries: int,
        backoff: float,
        max_backoff: float,
        chunk_size: int,
        max_concurrency: int,
        model: str | None,
        run: str | None = None,
    ) -> Settings:
        """Check the arguments.

        Raises:
            ValueError: an argument is out of range; the message says which and what it accepts.
        """
        urls = (base_url,) if isinstance(base_url, str) else tuple(base_url)
        if not urls:
            raise ValueError("base_url is empty; pass the server's URL, e.g. 'http://127.0.0.1:8000'.")
        for url in urls:
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise ValueError(f"base_url {url!r} must start with http:// or https://.")
        for name, value, low in (
            ("chunk_size", chunk_size, 1),
            ("max_concurrency", max_concurrency, 1),
            ("max_retries", max_retries, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
        for name, number in (("backoff", backoff), ("max_backoff", max_backoff)):
            if not math.isfinite(number) or number < 0:
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {number!r}.")
        if api_key is not None and not api_key:
            raise ValueError("api_key is empty; pass the server's key, or None when it needs none.")
        if run is not None and not RUN_NAME.fullmatch(run):
            raise ValueError(
                f"run {run!r} must be 1 to 128 letters, digits and ._:/@+- (a training run's name), or None."
            )
        return cls(
            base_urls=tuple(url.rstrip("/") for url in urls),
            api_key=api_key,
            timeout=timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout),
            max_retries=max_retries,
            backoff=float(backoff),
            max_backoff=float(max_backoff),
            chunk_size=chunk_size,
            max_concurrency=max_concurrency,
            model=model,
            run=run,
        )

    def headers(self) -> dict[str, str]:
        """Headers of every request."""
        headers = {"user-agent": f"rmserve-client/{__version__}", "accept": "application/json"}
        if self.api_key is not None:
            headers["authorization"] = f"Bearer {self.api_key}"
        if self.run is not None:
            headers[RUN_HEADER] = self.run
        return headers

    def probe_timeout(self) -> httpx.Timeout:
        """Timeout of /health and /ready probes: the client's, at most 10 s (a probe should be quick)."""
        read = self.timeout.read
        return httpx.Timeout(PROBE_TIMEOUT if read is None else min(read, PROBE_TIMEOUT))

    def limits(self) -> httpx.Limits:
        """Connection pool limits: the concurrency is bounded by the client itself, keep-alive by it too."""
        return httpx.Limits(max_connections=None, max_keepalive_connections=self.max_concurrency)


class UrlRotation:
    """Round robin over the base URLs: each request takes the next start, each retry the next URL.

    Thread-safe; starts are handed out in call order, so chunks are spread evenly whatever the timing.
    """

    def __init__(self, urls: tuple[str, ...]) -> None:
        self._urls = urls
        self._counter = itertools.count()
        self._lock = threading.Lock()

    def start(self) -> int:
        with self._lock:
            return next(self._counter)

    def url(self, start: int, attempt: int) -> str:
        return self._urls[(start + attempt) % len(self._urls)]


@dataclass(frozen=True)
class ScoreOptions:
    """The per-call options of the score methods, checked, in the server's JSON names."""

    model: str | None
    aggregates: tuple[str, ...]
    return_heads: bool
    uwo_lambda: float | None
    tradeoff_lambda: float | None
    truncation: str | None
    tradeoff_scope: str | None = None
    brme_sample: bool = False
    brme_seed: int | None = None

    @property
    def whole_call(self) -> bool:
        """Whether the call must go as one request: its forms are computed over a request's inputs."""
        return self.tradeoff_scope == "request" or self.brme_sample

    @classmethod
    def create(
        cls,
        settings: Settings,
        *,
        model: str | None,
        aggregates: str | Sequence[str] | None,
        return_heads: bool,
        uwo_lambda: float | None,
        tradeoff_lambda: float | None,
        truncation: str | None,
        tradeoff_scope: str | None = None,
        brme_sample: bool = False,
        brme_seed: int | None = None,
    ) -> ScoreOptions:
        """Check the options (aggregate names are left to the server, which lists the valid ones).

        Raises:
            ValueError: a lambda is not finite, truncation is not left, right or error, tradeoff_scope
                is not input or request, or brme_seed is given without brme_sample or is negative.
        """
        if tradeoff_scope is not None and tradeoff_scope not in ("input", "request"):
            raise ValueError(f"tradeoff_scope must be 'input', 'request' or None, got {tradeoff_scope!r}.")
        if brme_seed is not None and (not brme_sample or brme_seed < 0):
            raise ValueError("brme_seed seeds brme_sample's draws: give brme_sample=True and a seed >= 0.")
        if isinstance(aggregates, str):
            aggregates = [aggregates]
        for name, value in (("uwo_lambda", uwo_lambda), ("tradeoff_lambda", tradeoff_lambda)):
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}.")
        if truncation is not None and truncation not in TRUNCATIONS:
            raise ValueError(
                f"truncation must be one of {', '.join(TRUNCATIONS)} or None, got {truncation!r}."
            )
        return cls(
            model=model if model is not None else settings.model,
            aggregates=tuple(dict.fromkeys(aggregates or ())),
            return_heads=bool(return_heads),
            uwo_lambda=uwo_lambda,
            tradeoff_lambda=tradeoff_lambda,
            truncation=truncation,
            tradeoff_scope=tradeoff_scope,
            brme_sample=bool(brme_sample),
            brme_seed=brme_seed,
        )

    def body(self, inputs: list[JsonInput]) -> bytes:
        """The JSON body of ``POST /v1/score`` for ``inputs`` (options left at None are not sent)."""
        payload: dict[str, object] = {"inputs": inputs}
        if self.model is not None:
            payload["model"] = self.model
        if self.truncation is not None:
            payload["truncation"] = self.truncation
        payload["aggregates"] = list(self.aggregates)
        if self.uwo_lambda is not None:
            payload["uwo_lambda"] = self.uwo_lambda
        if self.tradeoff_lambda is not None:
            payload["tradeoff_lambda"] = self.tradeoff_lambda
        payload["return_heads"] = self.return_heads
        if self.tradeoff_scope is not None:
            payload["tradeoff_scope"] = self.tradeoff_scope
        if self.brme_sample:
            payload["brme_sample"] = True
        if self.brme_seed is not None:
            payload["brme_seed"] = self.brme_seed
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Chunk:
    """One request of a call: inputs ``start:stop`` and their encoded body."""

    info: ChunkInfo
    body: bytes

    @property
    def size(self) -> int:
        return self.info.stop - self.info.start


def plan_chunks(inputs: list[JsonInput], options: ScoreOptions, chunk_size: int) -> list[Chunk]:
    """Split ``inputs`` into requests of at most ``chunk_size`` inputs, bodies encoded once (retries reuse them).

    A call whose options are computed over a request's inputs (``ScoreOptions.whole_call``) is one request.
    """
    if options.whole_call:
        chunk_size = max(1, len(inputs))
    starts = range(0, len(inputs), chunk_size)
    return [
        Chunk(
            ChunkInfo(i, len(starts), s, min(s + chunk_size, len(inputs))),
            options.body(inputs[s : s + chunk_size]),
        )
        for i, s in enumerate(starts)
    ]


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """The wait a ``Retry-After`` header asks for: delay-seconds or an HTTP date; None when absent or invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds) if math.isfinite(seconds) else None


@dataclass
class RetryState:
    """The retry bookkeeping of one request: call ``delay_after`` with each failure.

    Attributes:
        attempts: requests sent so far that failed.
        server_errors: how many of them were answered 500 (retried once only).
    """

    settings: Settings
    attempts: int = 0
    server_errors: int = 0

    def delay_after(self, failure: httpx.Response | httpx.TransportError) -> float | None:
        """Record a failed attempt; return the seconds to wait before the next one, or None to give up."""
        self.attempts += 1
        if self.attempts > self.settings.max_retries:
            return None
        if isinstance(failure, httpx.Response):
            status = failure.status_code
            if status in RETRY_ONCE_STATUSES:
                self.server_errors += 1
                if self.server_errors > 1:
                    return None
            elif status not in RETRY_STATUSES:
                return None
        jitter = backoff_delay(self.settings, self.attempts - 1)
        if isinstance(failure, httpx.Response):
            asked = retry_after_seconds(failure.headers.get("retry-after"))
            if asked is not None:
                return min(asked, self.settings.max_backoff) + jitter
        return jitter

    def error(self, failure: httpx.Response | httpx.TransportError, url: str) -> RewardClientError:
        """The exception to raise once ``delay_after`` gave up."""
        if isinstance(failure, httpx.Response):
            return error_from_response(failure, attempts=self.attempts, url=url)
        return connection_error(failure, attempts=self.attempts, url=url)


def backoff_delay(settings: Settings, retry: int) -> float:
    """Full jitter: ``uniform(0, min(max_backoff, backoff * 2**retry))`` for retry number ``retry`` (0-based)."""
    ceiling = settings.max_backoff if retry >= 64 else min(settings.max_backoff, settings.backoff * 2**retry)
    return random.uniform(0, ceiling)


Body = TypeVar("Body", bound=BaseModel)


def _parse(model: type[Body], response: httpx.Response, url: str) -> Body:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise RewardClientError(
            f"unexpected {response.status_code} body from {url}: {exc.errors()[0].get('msg', exc)}. "
            "Hint: check that base_url points at an rmserve server of a version this client supports."
        ) from exc


def parse_score(response: httpx.Response, chunk: Chunk, url: str) -> ScoreBody:
    """The body of a 200 score answer, checked to hold one entry per input of ``chunk``.

    Raises:
        RewardClientError: the body is not a score answer, or its lists have the wrong length.
    """
    body = _parse(ScoreBody, response, url)
    columns: dict[str, Sequence[object] | None] = {
        "rewards": body.rewards,
        "truncated": body.truncated,
        "heads": body.heads,
        "head_std": body.head_std,
        "categories": body.categories,
        **{f"aggregates.{k}": v for k, v in body.aggregates.items()},
    }
    for name, column in columns.items():
        if column is not None and len(column) != chunk.size:
            raise RewardClientError(
                f"{url} returned {len(column)} {name} for {chunk.size} inputs; the server is not "
                "answering one entry per input. Hint: upgrade the server or the client so that they match."
            )
    return body


def parse_runs(response: httpx.Response, url: str) -> list[dict[str, Any]]:
    """The runs of a 200 ``GET /v1/runs`` answer."""
    return _parse(RunListBody, response, url).data


def parse_run(response: httpx.Response, url: str) -> RunBody:
    """One run's series, from a 200 ``GET /v1/runs/{run}`` answer."""
    return _parse(RunBody, response, url)


def run_path(name: str) -> str:
    """The path of one run's series (run names hold only URL-safe characters).

    Raises:
        ValueError: a malformed run name.
    """
    if not RUN_NAME.fullmatch(name):
        raise ValueError(f"run {name!r} must be 1 to 128 letters, digits and ._:/@+-.")
    return f"{RUNS_PATH}/{name}"


def parse_models(response: httpx.Response, url: str) -> list[ModelInfo]:
    """The served models of a 200 ``GET /v1/models`` answer."""
    return _parse(ModelListBody, response, url).data


def empty_result(options: ScoreOptions) -> ScoreResult:
    """The result of an empty batch (no request is sent)."""
    return ScoreResult(
        model=options.model or "",
        reward="",
        rewards=[],
        aggregates={name: [] for name in options.aggregates},
        heads=[] if options.return_heads else None,
        head_std=None,
        truncated=[],
        input_tokens=0,
        requests=0,
    )


def assemble(bodies: Sequence[ScoreBody], requests: int) -> ScoreResult:
    """Concatenate chunk answers (given in chunk order) into one result in input order.

    Raises:
        RewardClientError: chunks were scored by different models (replicas serving different
            default models), or disagree on which fields they return.
    """
    first = bodies[0]
    for body in bodies[1:]:
        if (body.model, body.reward, sorted(body.aggregates)) != (
            first.model,
            first.reward,
            sorted(first.aggregates),
        ):
            raise RewardClientError(
                f"chunks were scored differently: model {first.model!r} (reward {first.reward!r}) and "
                f"model {body.model!r} (reward {body.reward!r}). Hint: the base URLs serve different "
                "models; pass model=<name>, or list only replicas that serve the same models."
            )
    return ScoreResult(
        model=first.model,
        reward=first.reward,
        rewards=[r for body in bodies for r in body.rewards],
        aggregates={name: [v for body in bodies for v in body.aggregates[name]] for name in first.aggregates},
        heads=_concat([body.heads for body in bodies], "heads"),
        head_std=_concat([body.head_std for body in bodies], "head_std"),
        categories=_concat([body.categories for body in bodies], "categories"),
        truncated=[t for body in bodies for t in body.truncated],
        input_tokens=sum(body.usage.input_tokens for body in bodies),
        requests=requests,
        brme_seed=first.brme_seed,
    )


Row = TypeVar("Row")


def _concat(parts: Sequence[list[Row] | None], name: str) -> list[Row] | None:
    if all(part is None for part in parts):
        return None
    if any(part is None for part in parts):
        raise RewardClientError(
            f"some chunks returned {name} and others did not. Hint: the base URLs serve different models; "
            "pass model=<name>, or list only replicas that serve the same models."
        )
    return [row for part in parts if part is not None for row in part]
