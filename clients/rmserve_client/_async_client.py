"""``AsyncRewardClient``: the asyncio client; chunks of a large call go out as tasks under a semaphore.

Same constructor and methods as ``RewardClient``, as coroutines. One ``httpx.AsyncClient`` holds the
connection pool, and one ``asyncio.Semaphore`` of ``max_concurrency`` bounds the requests in flight
across every call made through this client. A chunk holds its slot through its retries and backoff.
Like ``httpx.AsyncClient``, an instance must be used from one event loop (it may be created outside
it); it runs on asyncio (not trio).

All decisions (chunking, retries, backoff, errors, reassembly) live in ``_core``; this module only
sends, sleeps and waits.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
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


class AsyncRewardClient:
    """An asyncio client of an rmserve server (or of several replicas).

    Arguments as for ``RewardClient``, except ``transport`` (an ``httpx.AsyncBaseTransport``) and
    ``sleep`` (a coroutine function, ``asyncio.sleep`` by default).

    Example::

        async with AsyncRewardClient("http://127.0.0.1:8000") as client:
            result = await client.score(["How do I bake bread?"], ["Mix flour, water, yeast and salt."])
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
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
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
        self._http = httpx.AsyncClient(
            headers=self._settings.headers(),
            timeout=self._settings.timeout,
            limits=self._settings.limits(),
            transport=transport,
        )
        self._urls = UrlRotation(self._settings.base_urls)
        self._sleep = sleep
        self._slots = asyncio.Semaphore(self._settings.max_concurrency)
        self._closed = False

    @property
    def base_urls(self) -> tuple[str, ...]:
        """The base URLs requests are spread over."""
        return self._settings.base_urls

    @property
    def chunk_size(self) -> int:
        """Inputs per request."""
        return self._settings.chunk_size

    async def score(
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
        """Score each response to its prompt; see ``RewardClient.score``."""
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
        return await self._score(prompt_response_inputs(prompts, responses), options)

    async def score_messages(
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
        """Score whole conversations; see ``RewardClient.score_messages``."""
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
        return await self._score(message_inputs(conversations), options)

    async def score_texts(
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
        """Score already formatted texts; see ``RewardClient.score_texts``."""
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
        return await self._score(text_inputs(texts, add_special_tokens), options)

    async def score_ids(
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
        """Score token id lists; see ``RewardClient.score_ids``."""
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
        return await self._score(id_inputs(token_id_lists), options)

    async def runs(self) -> list[dict[str, Any]]:
        """The training runs the server's monitor keeps, most recently seen first (of the first base URL
        that answers; each replica monitors the requests it serves).

        Raises:
            RewardServerError, RewardConnectionError: as in ``score``.
        """
        response, url, _ = await self._request("GET", RUNS_PATH, None, self._urls.start())
        return parse_runs(response, url)

    async def run(self, name: str) -> RunBody:
        """One run's time series per model (``docs/monitor.md``).

        Raises:
            ValueError: a malformed run name.
            RewardServerError: 404 for a run the server does not keep; otherwise as in ``score``.
            RewardConnectionError: as in ``score``.
        """
        response, url, _ = await self._request("GET", run_path(name), None, self._urls.start())
        return parse_run(response, url)

    async def models(self) -> list[ModelInfo]:
        """The served models (of the first base URL that answers); see ``RewardClient.models``."""
        response, url, _ = await self._request("GET", MODELS_PATH, None, self._urls.start())
        return parse_models(response, url)

    async def health(self) -> bool:
        """Whether every base URL answers ``GET /health`` with 200 within 10 s (never raises)."""
        probes = await asyncio.gather(*(self._probe(url + "/health") for url in self._settings.base_urls))
        return all(probes)

    async def ready(self) -> bool:
        """Whether every base URL answers ``GET /ready`` with 200 within 10 s: models loaded, not shutting down."""
        probes = await asyncio.gather(*(self._probe(url + "/ready") for url in self._settings.base_urls))
        return all(probes)

    async def aclose(self) -> None:
        """Close the connections; the client cannot be used afterwards."""
        self._closed = True
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncRewardClient({', '.join(self._settings.base_urls)})"

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

    async def _score(self, inputs: list[JsonInput], options: ScoreOptions) -> ScoreResult:
        if self._closed:
            raise RuntimeError("this AsyncRewardClient is closed; create a new one.")
        if not inputs:
            return empty_result(options)
        chunks = plan_chunks(inputs, options, self._settings.chunk_size)
        starts = [self._urls.start() for _ in chunks]  # handed out in chunk order: an even spread
        results = await self._send_concurrently(chunks, starts)
        return assemble([body for body, _ in results], requests=sum(n for _, n in results))

    async def _send_concurrently(self, chunks: list[Chunk], starts: list[int]) -> list[tuple[ScoreBody, int]]:
        if len(chunks) == 1:
            return [await self._send_chunk(chunks[0], starts[0])]
        tasks = [asyncio.ensure_future(self._send_chunk(c, s)) for c, s in zip(chunks, starts, strict=True)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:  # after a failure (or if this call is cancelled): stop the other chunks
            pending = [t for t in tasks if not t.done()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        failed = [t for t in tasks if t in done and not t.cancelled() and t.exception() is not None]
        if failed:
            exc = failed[0].exception()
            assert exc is not None
            if isinstance(exc, RewardClientError):
                exc.chunk = chunks[tasks.index(failed[0])].info
            raise exc
        return [t.result() for t in tasks]

    async def _send_chunk(self, chunk: Chunk, start: int) -> tuple[ScoreBody, int]:
        async with self._slots:
            response, url, attempts = await self._request("POST", SCORE_PATH, chunk.body, start)
        return parse_score(response, chunk, url), attempts

    async def _request(
        self, method: str, path: str, body: bytes | None, start: int
    ) -> tuple[httpx.Response, str, int]:
        """Send with retries; return the 200 answer, its URL and the attempts it took."""
        state = RetryState(self._settings)
        headers = {"content-type": "application/json"} if body is not None else {}
        while True:
            url = self._urls.url(start, state.attempts) + path
            failure: httpx.Response | httpx.TransportError
            try:
                response = await self._http.request(
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
            await self._sleep(delay)

    async def _probe(self, url: str) -> bool:
        try:
            return (await self._http.get(url, timeout=self._settings.probe_timeout())).status_code == 200
        except httpx.TransportError:
            return False
