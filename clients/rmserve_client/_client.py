"""``RewardClient``: the blocking client; chunks of a large call go out concurrently from a thread pool.

Why threads (and not an event loop under the hood): a blocking client is called from training
loops, Jupyter cells and TRL's reward hooks, some of which already run an event loop, where
``asyncio.run`` fails; and the work is waiting on sockets, which releases the GIL. One
``httpx.Client`` (documented as safe to share between threads) holds the connection pool, and one
``ThreadPoolExecutor`` of ``max_concurrency`` workers, created on first need and owned by the
client, bounds the requests in flight across every call made through this client, including calls
from several threads at once. A chunk holds its worker through its retries and backoff, so an
overloaded server sees fewer requests, not more.

All decisions (chunking, retries, backoff, errors, reassembly) live in ``_core``; this module only
sends, sleeps and waits.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from types import TracebackType
from typing import Any

import httpx

from rmserve_client._core import (
    MODELS_PATH,
    RUNS_PATH,
    SCORE_PATH,
    Chunk,
    RetryState,
    ScoreOptions,
    Settings,
    UrlRotation,
    assemble,
    empty_result,
    parse_models,
    parse_run,
    parse_runs,
    parse_score,
    plan_chunks,
    run_path,
)
from rmserve_client._errors import RewardClientError
from rmserve_client._inputs import (
    JsonInput,
    id_inputs,
    message_inputs,
    prompt_response_inputs,
    text_inputs,
)
from rmserve_client._models import ModelInfo, RunBody, ScoreBody, ScoreResult


class RewardClient:
    """A blocking client of an rmserve server (or of several replicas).

    Args:
        base_url: the server's root URL, e.g. ``http://127.0.0.1:8000``, or a list of replicas'
            URLs: chunks are spread over them round robin, and a retry goes to the next one.
        api_key: sent as ``Authorization: Bearer <api_key>`` when given.
        timeout: seconds (or an ``httpx.Timeout``) for each HTTP request.
        max_retries: retries per request on connection errors, timeouts, 429, 502, 503, 504 (and
            one on 500); see ``rmserve_client._core`` for the policy.
        backoff: base of the exponential backoff, in seconds.
        max_backoff: ceiling of one backoff wait (and of an honoured ``Retry-After``), in seconds.
        chunk_size: inputs per request; a larger call is split and reassembled in input order.
        max_concurrency: requests in flight at once, across every call made through this client.
        model: the model to use when a call names none (None: the server's default model).
        run: the training run these calls belong to, sent as ``x-rmserve-run`` (the server's run monitor
            keeps a time series per run); None: no run.
        transport: an ``httpx`` transport, e.g. ``httpx.MockTransport`` in tests.
        sleep: how to wait between retries (``time.sleep``); tests pass a recorder.

    Raises:
        ValueError: an argument is out of range.

    Example::

        with RewardClient("http://127.0.0.1:8000") as client:
            result = client.score(["How do I bake bread?"], ["Mix flour, water, yeast and salt."])
            print(result.rewards)
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 180.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        chunk_size: int = 256,
        max_concurrency: int = 8,
        model: str | None = None,
        run: str | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._settings = Settings.create(
            base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            max_backoff=max_backoff,
            chunk_size=chunk_size,
            max_concurrency=max_concurrency,
            model=model,
            run=run,
        )
        self._http = httpx.Client(
            headers=self._settings.headers(),
            timeout=self._settings.timeout,
            limits=self._settings.limits(),
            transport=transport,
        )
        self._urls = UrlRotation(self._settings.base_urls)
        self._sleep = sleep
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._closed = False

    @property
    def base_urls(self) -> tuple[str, ...]:
        """The base URLs requests are spread over."""
        return self._settings.base_urls

    @property
    def chunk_size(self) -> int:
        """Inputs per request."""
        return self._settings.chunk_size

    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        *,
        model: str | None = None,
        aggregates: str | Sequence[str] | None = None,
        return_heads: bool = False,
        uwo_lambda: float | None = None,
        tradeoff_lambda: float | None = None,
        truncation: str | None = None,
        tradeoff_scope: str | None = None,
        brme_sample: bool = False,
        brme_seed: int | None = None,
    ) -> ScoreResult:
        """Score each response to its prompt (a user turn and the assistant's reply).

        Args:
            prompts: user prompts, one per response.
            responses: the assistant responses to score.
            model: the model to use (default: the client's ``model``, else the server's default).
            aggregates: aggregates over the model's heads to return besides ``rewards``
                (mean, min, max, std, uwo, nominal, tradeoff).
            return_heads: also return every head's reward (and sigma for brme models).
            uwo_lambda: UWO's lambda (default: the model's).
            tradeoff_lambda: the trade-off aggregate's lambda (default: the model's).
            truncation: over-long inputs: ``left`` keeps the end, ``right`` the start, ``error``
                refuses them (default: the model's policy).
            tradeoff_scope: ``input`` (default) or ``request``: the trade-off's worst case is the head
                with the lowest mean reward over this call's inputs (BRME); the call goes as one request.
            brme_sample: brme models: score samples ``mu + a * sigma`` (the call goes as one request).
            brme_seed: seeds ``brme_sample`` (default: the server draws one; ``result.brme_seed``).

        Returns:
            The rewards in input order; an empty result, without a request, for empty lists.

        Raises:
            ValueError, TypeError: the arguments are malformed (no request is sent).
            RewardServerError: the server refused or failed a request (a subclass says how).
            RewardConnectionError: the server could not be reached after the retries.
        """
        options = self._options(
            model,
            aggregates,
            return_heads,
            uwo_lambda,
            tradeoff_lambda,
            truncation,
            tradeoff_scope,
            brme_sample,
            brme_seed,
        )
        return self._score(prompt_response_inputs(prompts, responses), options)

    def score_messages(
        self,
        conversations: Sequence[Sequence[Mapping[str, Any]]],
        *,
        model: str | None = None,
        aggregates: str | Sequence[str] | None = None,
        return_heads: bool = False,
        uwo_lambda: float | None = None,
        tradeoff_lambda: float | None = None,
        truncation: str | None = None,
        tradeoff_scope: str | None = None,
        brme_sample: bool = False,
        brme_seed: int | None = None,
    ) -> ScoreResult:
        """Score whole conversations (lists of ``{"role", "content"}``; the last turn is normally scored).

        The server formats each with the model's chat template. Options, result and errors as in ``score``.
        """
        options = self._options(
            model,
            aggregates,
            return_heads,
            uwo_lambda,
            tradeoff_lambda,
            truncation,
            tradeoff_scope,
            brme_sample,
            brme_seed,
        )
        return self._score(message_inputs(conversations), options)

    def score_texts(
        self,
        texts: Sequence[str],
        *,
        model: str | None = None,
        aggregates: str | Sequence[str] | None = None,
        return_heads: bool = False,
        uwo_lambda: float | None = None,
        tradeoff_lambda: float | None = None,
        truncation: str | None = None,
        tradeoff_scope: str | None = None,
        brme_sample: bool = False,
        brme_seed: int | None = None,
        add_special_tokens: bool | None = None,
    ) -> ScoreResult:
        """Score already formatted texts (e.g. chat-templated strings), as they are.

        ``add_special_tokens``: whether the server's tokenizer adds its special tokens (BOS, ...) to each
        text; None: the tokenizer's default (a BOS the text already starts with is never doubled). Other
        options, result and errors as in ``score``.
        """
        options = self._options(
            model,
            aggregates,
            return_heads,
            uwo_lambda,
            tradeoff_lambda,
            truncation,
            tradeoff_scope,
            brme_sample,
            brme_seed,
        )
        return self._score(text_inputs(texts, add_special_tokens), options)

    def score_ids(
        self,
        token_id_lists: Sequence[Sequence[int]],
        *,
        model: str | None = None,
        aggregates: str | Sequence[str] | None = None,
        return_heads: bool = False,
        uwo_lambda: float | None = None,
        tradeoff_lambda: float | None = None,
        truncation: str | None = None,
        tradeoff_scope: str | None = None,
        brme_sample: bool = False,
        brme_seed: int | None = None,
    ) -> ScoreResult:
        """Score token id lists of the model's tokenizer, used exactly as given.

        Options, result and errors as in ``score``.
        """
        options = self._options(
            model,
            aggregates,
            return_heads,
            uwo_lambda,
            tradeoff_lambda,
            truncation,
            tradeoff_scope,
            brme_sample,
            brme_seed,
        )
        return self._score(id_inputs(token_id_lists), options)

    def runs(self) -> list[dict[str, Any]]:
        """The training runs the server's monitor keeps, most recently seen first (of the first base URL
        that answers; each replica monitors the requests it serves).

        Raises:
            RewardServerError, RewardConnectionError: as in ``score``.
        """
        response, url, _ = self._request("GET", RUNS_PATH, None, self._urls.start())
        return parse_runs(response, url)

    def run(self, name: str) -> RunBody:
        """One run's time series per model (``docs/monitor.md``).

        Raises:
            ValueError: a malformed run name.
            RewardServerError: 404 for a run the server does not keep; otherwise as in ``score``.
            RewardConnectionError: as in ``score``.
        """
        response, url, _ = self._request("GET", run_path(name), None, self._urls.start())
        return parse_run(response, url)

    def models(self) -> list[ModelInfo]:
        """The served models (of the first base URL that answers).

        Raises:
            RewardServerError, RewardConnectionError: as in ``score``.
        """
        response, url, _ = self._request("GET", MODELS_PATH, None, self._urls.start())
        return parse_models(response, url)

    def health(self) -> bool:
        """Whether every base URL answers ``GET /health`` with 200 within 10 s (never raises)."""
        return all(self._probe(url + "/health") for url in self._settings.base_urls)

    def ready(self) -> bool:
        """Whether every base URL answers ``GET /ready`` with 200 within 10 s: models loaded, not shutting down."""
        return all(self._probe(url + "/ready") for url in self._settings.base_urls)

    def close(self) -> None:
        """Close the connections and the worker threads; the client cannot be used afterwards."""
        self._closed = True
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self._http.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RewardClient({', '.join(self._settings.base_urls)})"

    # -- I/O -------------------------------------------------------------------------------------

    def _options(
        self,
        model: str | None,
        aggregates: str | Sequence[str] | None,
        return_heads: bool,
        uwo_lambda: float | None,
        tradeoff_lambda: float | None,
        truncation: str | None,
        tradeoff_scope: str | None,
        brme_sample: bool,
        brme_seed: int | None,
    ) -> ScoreOptions:
        return ScoreOptions.create(
            self._settings,
            model=model,
            aggregates=aggregates,
            return_heads=return_heads,
            uwo_lambda=uwo_lambda,
            tradeoff_lambda=tradeoff_lambda,
            truncation=truncation,
            tradeoff_scope=tradeoff_scope,
            brme_sample=brme_sample,
            brme_seed=brme_seed,
        )

    def _score(self, inputs: list[JsonInput], options: ScoreOptions) -> ScoreResult:
        if self._closed:
            raise RuntimeError("this RewardClient is closed; create a new one.")
        if not inputs:
            return empty_result(options)
        chunks = plan_chunks(inputs, options, self._settings.chunk_size)
        starts = [self._urls.start() for _ in chunks]  # handed out in chunk order: an even spread
        results = self._send_concurrently(chunks, starts)
        return assemble([body for body, _ in results], requests=sum(n for _, n in results))

    def _send_concurrently(self, chunks: list[Chunk], starts: list[int]) -> list[tuple[ScoreBody, int]]:
        """Send every chunk from the pool (a single chunk too, so that max_concurrency bounds all calls)."""
        pool = self._executor()
        futures = [pool.submit(self._send_chunk, c, s) for c, s in zip(chunks, starts, strict=True)]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        finally:
            for future in futures:  # after a failure (or an interrupt): drop the chunks not started yet
                future.cancel()
        failed = [f for f in futures if f in done and not f.cancelled() and f.exception() is not None]
        if failed and len(chunks) > 1:
            raise _located(failed[0], chunks[futures.index(failed[0])])
        return [f.result() for f in futures]

    def _send_chunk(self, chunk: Chunk, start: int) -> tuple[ScoreBody, int]:
        response, url, attempts = self._request("POST", SCORE_PATH, chunk.body, start)
        return parse_score(response, chunk, url), attempts

    def _request(
        self, method: str, path: str, body: bytes | None, start: int
    ) -> tuple[httpx.Response, str, int]:
        """Send with retries; return the 200 answer, its URL and the attempts it took."""
        state = RetryState(self._settings)
        headers = {"content-type": "application/json"} if body is not None else {}
        while True:
            url = self._urls.url(start, state.attempts) + path
            failure: httpx.Response | httpx.TransportError
            try:
                response = self._http.request(
                    method, url, content=body, headers={**headers, "x-request-id": uuid.uuid4().hex}
                )
            except httpx.TransportError as exc:
                failure = exc
            else:
                if response.status_code == 200:
                    return response, url, state.attempts + 1
                failure = response
            delay = state.delay_after(failure)
            if delay is None:
                raise state.error(failure, url)
            self._sleep(delay)

    def _probe(self, url: str) -> bool:
        try:
            return self._http.get(url, timeout=self._settings.probe_timeout()).status_code == 200
        except httpx.TransportError:
            return False

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._closed:
                raise RuntimeError("this RewardClient is closed; create a new one.")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self._settings.max_concurrency, thread_name_prefix="rmserve-client"
                )
            return self._pool


def _located(future: Future[tuple[ScoreBody, int]], chunk: Chunk) -> BaseException:
    """The exception of a failed chunk, tagged with which chunk and inputs failed."""
    exc = future.exception()
    assert exc is not None
    if isinstance(exc, RewardClientError):
        exc.chunk = chunk.info
    return exc
