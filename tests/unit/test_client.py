"""rmserve_client against httpx.MockTransport: payloads, chunking, load balancing, retries, errors, TRL.

No server: a ``FakeServer`` handler answers like rmserve (reward = the number in each input) and can
be scripted with failures. The sleeper is injected, so retries take no time and their waits are checked.
"""

from __future__ import annotations

import array
import asyncio
import importlib.metadata
import inspect
import json
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import rmserve_client
from rmserve_client import (
    AsyncRewardClient,
    ChunkInfo,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    RequestTooLarge,
    RewardClient,
    RewardClientError,
    RewardConnectionError,
    RewardServerError,
    ScoringFailed,
    Unauthorized,
    as_async_reward_func,
    as_reward_func,
)
from rmserve_client._core import RetryState, Settings, backoff_delay, retry_after_seconds

CLIENTS_DIR = Path(__file__).resolve().parents[2] / "clients"
URL = "http://rm.test"

Script = httpx.Response | Exception | Callable[[httpx.Request], "httpx.Response | None"]


def value_of(item: dict[str, Any]) -> float:
    """The fake reward of an input: the number its text carries (ids: the first id)."""
    if "prompt" in item:
        return float(item["prompt"].lstrip("p"))
    if "messages" in item:
        return float(item["messages"][-1]["content"].lstrip("m"))
    if "text" in item:
        return float(item["text"].lstrip("t"))
    return float(item["input_ids"][0])


def error(status: int, type_: str, message: str, **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"type": type_, "message": message}}, headers=headers)


class FakeServer:
    """An httpx handler that answers like rmserve; ``script`` entries are answered first, in order.

    A script entry is a response, an exception to raise, or a function of the request that returns
    a response (or None to answer normally). ``delay`` returns seconds to sleep for a request body.
    """

    def __init__(
        self,
        *script: Script,
        model: str = "llama",
        delay: Callable[[dict[str, Any]], float] | None = None,
    ) -> None:
        self.script = list(script)
        self.model = model
        self.delay = delay
        self.requests: list[httpx.Request] = []
        self.finished: list[float] = []  # first reward of each answered chunk, in answer order
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests if r.method == "POST"]

    def _begin(self, request: httpx.Request) -> Script | None:
        with self._lock:
            self.requests.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self.script.pop(0) if self.script else None

    def _answer(self, request: httpx.Request, scripted: Script | None) -> httpx.Response:
        with self._lock:
            self.in_flight -= 1
        if isinstance(scripted, Exception):
            raise scripted
        if isinstance(scripted, httpx.Response):
            return scripted
        if scripted is not None and (response := scripted(request)) is not None:
            return response
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        if request.url.path in ("/health", "/ready"):
            return httpx.Response(200, json={"status": "ok"})
        body = json.loads(request.content)
        rewards = [value_of(item) for item in body["inputs"]]
        with self._lock:
            self.finished.append(rewards[0])
        n = len(rewards)
        return httpx.Response(
            200,
            json={
                "model": body.get("model") or self.model,
                "reward": "mean",
                "rewards": rewards,
                "aggregates": {name: [10 * r for r in rewards] for name in body.get("aggregates", [])},
                "heads": [[r, r + 1] for r in rewards] if body.get("return_heads") else None,
                "head_std": None,
                "truncated": [r % 2 == 1 for r in rewards],
                "usage": {"input_tokens": 3 * n},
            },
            headers={"x-request-id": request.headers.get("x-request-id", "")},
        )

    def __call__(self, request: httpx.Request) -> httpx.Response:
        scripted = self._begin(request)
        if self.delay is not None and request.method == "POST":
            time.sleep(self.delay(json.loads(request.content)))
        return self._answer(request, scripted)

    async def handle_async(self, request: httpx.Request) -> httpx.Response:
        scripted = self._begin(request)
        if self.delay is not None and request.method == "POST":
            await asyncio.sleep(self.delay(json.loads(request.content)))
        return self._answer(request, scripted)


MODELS = {
    "object": "list",
    "data": [
        {
            "id": "llama",
            "object": "model",
            "kind": "dense",
            "architecture": "LlamaForSequenceClassification",
            "heads": ["reward"],
            "reward": "mean",
            "aggregates": ["mean", "min", "max", "std", "uwo", "nominal", "tradeoff"],
            "uwo_lambda": 1.0,
            "tradeoff_lambda": 0.6,
            "max_length": 512,
            "default": True,
        }
    ],
}


class Sleeps(list[float]):
    """A recording sleeper for the sync client (``self(seconds)``) and the async one (``self.async_``)."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)

    async def async_(self, seconds: float) -> None:
        self.append(seconds)


def prompts(n: int) -> tuple[list[str], list[str]]:
    return [f"p{i}" for i in range(n)], [f"response {i}" for i in range(n)]


def hosts(server: FakeServer) -> list[str]:
    return [r.url.host for r in server.requests]


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def make_client(sleeps: Sleeps) -> Iterator[Callable[..., RewardClient]]:
    made: list[RewardClient] = []

    def make(server: FakeServer, base_url: str | list[str] = URL, **kwargs: Any) -> RewardClient:
        client = RewardClient(base_url, transport=httpx.MockTransport(server), sleep=sleeps, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def make_async(
    server: FakeServer, sleeps: Sleeps, base_url: str | list[str] = URL, **kwargs: Any
) -> AsyncRewardClient:
    return AsyncRewardClient(
        base_url, transport=httpx.MockTransport(server.handle_async), sleep=sleeps.async_, **kwargs
    )


# -- the package ---------------------------------------------------------------------------------


def test_all_lists_the_public_names_and_the_version_matches_pyproject():
    public = {
        name
        for name, value in vars(rmserve_client).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    } - {"annotations"}  # submodules (rmserve_client.verl, once imported) are not names of the package
    assert set(rmserve_client.__all__) == public | {"__version__"}
    # the installed metadata is built from clients/pyproject.toml
    assert rmserve_client.__version__ == importlib.metadata.version("rmserve-client") == "0.1.0"
    assert sorted(importlib.metadata.requires("rmserve-client") or []) == ["httpx>=0.27", "pydantic>=2"]
    assert (CLIENTS_DIR / "rmserve_client" / "py.typed").is_file()


def test_constructor_refuses_bad_arguments_with_a_hint():
    with pytest.raises(ValueError, match="must start with http:// or https://"):
        RewardClient("127.0.0.1:8000")
    with pytest.raises(ValueError, match="base_url is empty"):
        RewardClient([])
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        RewardClient(URL, chunk_size=0)
    with pytest.raises(ValueError, match="backoff must be a finite number"):
        RewardClient(URL, backoff=float("nan"))


# -- payloads and results ------------------------------------------------------------------------


def test_each_method_sends_its_input_form_and_the_options(make_client):
    server = FakeServer()
    client = make_client(server, model="default-model")
    client.score(["p1"], ["r"], aggregates=["uwo", "min", "uwo"], uwo_lambda=0.5, tradeoff_lambda=0.3,
                 truncation="right", return_heads=True, model="other")  # fmt: skip
    client.score_messages(
        [[{"role": "user", "content": "hi", "name": "x"}, {"role": "assistant", "content": "m2"}]]
    )
    client.score_texts(["t3"], aggregates="max")
    client.score_ids([[4, 5], array.array("q", [6, 7])])
    assert server.bodies == [
        {
            "inputs": [{"prompt": "p1", "response": "r"}],
            "model": "other",
            "truncation": "right",
            "aggregates": ["uwo", "min"],
            "uwo_lambda": 0.5,
            "tradeoff_lambda": 0.3,
            "return_heads": True,
        },
        {
            "inputs": [
                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "m2"}]}
            ],
            "model": "default-model",
            "aggregates": [],
            "return_heads": False,
        },
        {"inputs": [{"text": "t3"}], "model": "default-model", "aggregates": ["max"], "return_heads": False},
        {
            "inputs": [{"input_ids": [4, 5]}, {"input_ids": [6, 7]}],
            "model": "default-model",
            "aggregates": [],
            "return_heads": False,
        },
    ]
    assert all(
        r.url == f"{URL}/v1/score" and r.headers["content-type"] == "application/json"
        for r in server.requests
    )
    assert len({r.headers["x-request-id"] for r in server.requests}) == 4


def test_result_holds_every_column_in_input_order(make_client):
    result = make_client(FakeServer()).score(*prompts(3), aggregates=["uwo"], return_heads=True)
    assert result.model == "llama" and result.reward == "mean"
    assert result.rewards == [0.0, 1.0, 2.0]
    assert result.aggregates == {"uwo": [0.0, 10.0, 20.0]}
    assert result.heads == [[0.0, 1.0], [1.0, 2.0], [2.0, 3.0]]
    assert result.head_std is None
    assert result.truncated == [False, True, False]
    assert (result.input_tokens, result.requests, len(result)) == (9, 1, 3)


def test_an_empty_batch_returns_an_empty_result_without_a_request(make_client):
    server = FakeServer()
    result = make_client(server).score([], [], aggregates=["min"], return_heads=True)
    assert result.rewards == [] and result.aggregates == {"min": []} and result.heads == []
    assert (result.requests, result.input_tokens) == (0, 0)
    assert server.requests == []


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda c: c.score(["a", "b"], ["x"]), ValueError, "got 2 prompts and 1 responses"),
        (lambda c: c.score("abc", "xyz"), TypeError, "prompts must be a list of strings, got str"),
        (lambda c: c.score([1], ["x"]), TypeError, r"prompts\[0\] must be a str"),
        (lambda c: c.score_messages([[]]), ValueError, r"conversations\[0\] is empty"),
        (
            lambda c: c.score_messages([[{"role": "user"}]]),
            TypeError,
            r"conversations\[0\]\[0\] has no content",
        ),
        (lambda c: c.score_texts(["ok", ""]), ValueError, r"texts\[1\] is empty"),
        (lambda c: c.score_ids([[1, 2.5]]), TypeError, r"token_id_lists\[0\] holds 2.5"),
        (lambda c: c.score_ids([[]]), ValueError, r"token_id_lists\[0\] is empty"),
        (lambda c: c.score(["a"], ["b"], truncation="middle"), ValueError, "truncation must be one of"),
        (lambda c: c.score(["a"], ["b"], uwo_lambda=float("inf")), ValueError, "uwo_lambda must be a finite"),
    ],
)
def test_malformed_arguments_raise_before_any_request(make_client, call, error, match):
    server = FakeServer()
    with pytest.raises(error, match=match):
        call(make_client(server))
    assert server.requests == []


# -- chunking, concurrency, load balancing -------------------------------------------------------


def test_chunks_go_out_concurrently_and_come_back_in_input_order(make_client):
    # later chunks answer first: completion order is the reverse of the input order
    server = FakeServer(delay=lambda body: 0.002 * (60 - value_of(body["inputs"][0]) / 4))
    client = make_client(server, chunk_size=4, max_concurrency=4)
    result = client.score(*prompts(50))
    assert result.rewards == [float(i) for i in range(50)]
    assert result.truncated == [i % 2 == 1 for i in range(50)]
    assert (result.requests, result.input_tokens) == (13, 150)
    assert 2 <= server.max_in_flight <= 4
    assert server.finished != sorted(server.finished), "chunks were answered in input order"


def test_request_level_forms_go_as_one_request_with_their_options(make_client):
    server = FakeServer()
    client = make_client(server, chunk_size=2)
    result = client.score(*prompts(7), tradeoff_scope="request", brme_sample=True, brme_seed=5)
    assert result.rewards == [float(i) for i in range(7)] and result.requests == 1
    (body,) = server.bodies
    assert (body["tradeoff_scope"], body["brme_sample"], body["brme_seed"], len(body["inputs"])) == (
        "request",
        True,
        5,
        7,
    )
    client.score(*prompts(4))
    assert "tradeoff_scope" not in server.bodies[-1] and "brme_sample" not in server.bodies[-1]
    with pytest.raises(ValueError, match="brme_seed seeds brme_sample's draws"):
        client.score(*prompts(2), brme_seed=1)
    with pytest.raises(ValueError, match="tradeoff_scope must be 'input', 'request' or None"):
        client.score(*prompts(2), tradeoff_scope="batch")


def test_chunks_are_spread_round_robin_over_the_base_urls(make_client):
    server = FakeServer()
    client = make_client(server, ["http://rm-0", "http://rm-1/"], chunk_size=2, max_concurrency=1)
    assert client.base_urls == ("http://rm-0", "http://rm-1")
    assert client.score(*prompts(8)).rewards == [float(i) for i in range(8)]
    assert hosts(server) == ["rm-0", "rm-1", "rm-0", "rm-1"]
    assert [b["inputs"][0]["prompt"] for b in server.bodies] == ["p0", "p2", "p4", "p6"]


def test_max_concurrency_bounds_calls_from_several_threads(make_client):
    server = FakeServer(delay=lambda body: 0.01)
    client = make_client(server, chunk_size=2, max_concurrency=3)
    results: list[list[float]] = [[] for _ in range(4)]

    def call(i: int) -> None:
        results[i] = client.score(*prompts(10)).rewards

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [[float(i) for i in range(10)]] * 4
    assert server.max_in_flight == 3


def test_a_body_that_is_not_a_score_answer_is_reported(make_client):
    server = FakeServer(httpx.Response(200, json={"rewards": [1.0]}))
    with pytest.raises(RewardClientError, match=r"unexpected 200 body from http://rm\.test/v1/score"):
        make_client(server).score(*prompts(1))

    short = {
        "model": "m",
        "reward": "mean",
        "rewards": [1.0],
        "truncated": [False],
        "usage": {"input_tokens": 1},
    }
    server = FakeServer(httpx.Response(200, json=short))
    with pytest.raises(RewardClientError, match="returned 1 rewards for 2 inputs"):
        make_client(server).score(*prompts(2))


# -- retries -------------------------------------------------------------------------------------


def test_429_is_retried_on_the_next_url_after_retry_after(make_client, sleeps):
    server = FakeServer(error(429, "overloaded", "queue full", **{"Retry-After": "2"}))
    client = make_client(server, ["http://rm-0", "http://rm-1"], backoff=0.5)
    result = client.score(*prompts(2))
    assert result.rewards == [0.0, 1.0] and result.requests == 2
    assert hosts(server) == ["rm-0", "rm-1"]
    assert len(sleeps) == 1 and 2.0 <= sleeps[0] <= 2.5  # Retry-After plus at most one backoff of jitter


def test_retry_after_is_capped_at_max_backoff(make_client, sleeps):
    server = FakeServer(error(503, "not_ready", "models are still loading", **{"Retry-After": "3600"}))
    make_client(server, backoff=0.0, max_backoff=4.0).score(*prompts(1))
    assert sleeps == [4.0]


def test_503_and_connection_errors_are_retried_then_succeed(make_client, sleeps):
    server = FakeServer(
        httpx.ConnectError("connection refused"),
        error(503, "shutting_down", "the server is shutting down"),
        httpx.ReadTimeout("read timed out"),
    )
    result = make_client(server, backoff=1.0).score(*prompts(3))
    assert result.rewards == [0.0, 1.0, 2.0] and result.requests == 4
    assert len(sleeps) == 3
    assert all(0 <= s <= 2**n for n, s in enumerate(sleeps))  # full jitter: uniform(0, backoff * 2**n)


def test_500_is_retried_once(make_client):
    server = FakeServer(error(500, "scoring_failed", "scoring failed for the batch holding this input: OOM"))
    assert make_client(server).score(*prompts(1)).requests == 2

    server = FakeServer(*[error(500, "scoring_failed", "scoring failed: boom")] * 3)
    with pytest.raises(ScoringFailed, match="scoring failed: boom") as info:
        make_client(server).score(*prompts(1))
    assert len(server.requests) == 2 and info.value.attempts == 2


@pytest.mark.parametrize(
    ("response", "cls"),
    [
        (error(422, "invalid_input", "inputs[0]: the prompt is too long"), InvalidRequest),
        (error(400, "bad_request", "bad request"), InvalidRequest),
        (error(404, "model_not_found", "no model 'big'; served: llama"), ModelNotFound),
        (error(413, "too_many_inputs", "the request has 5000 inputs"), RequestTooLarge),
        (error(401, "unauthorized", "missing bearer token"), Unauthorized),
        (error(403, "forbidden", "wrong key"), Unauthorized),
    ],
)
def test_client_errors_are_not_retried(make_client, sleeps, response, cls):
    server = FakeServer(response)
    with pytest.raises(cls) as info:
        make_client(server).score(*prompts(2))
    exc = info.value
    assert isinstance(exc, RewardServerError) and isinstance(exc, RewardClientError)
    assert len(server.requests) == 1 and sleeps == []
    assert exc.status == response.status_code and exc.type == response.json()["error"]["type"]
    assert exc.server_message in str(exc) and "Hint:" in str(exc)
    assert exc.request_id == server.requests[0].headers["x-request-id"]
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is cls and str(copy) == str(exc) and copy.status == exc.status


def test_a_wrong_route_is_not_reported_as_an_unknown_model(make_client):
    server = FakeServer(error(404, "not_found", "no such route"))
    with pytest.raises(RewardServerError, match="without /v1") as info:
        make_client(server).score(*prompts(1))
    assert not isinstance(info.value, ModelNotFound)


def test_exhausted_retries_raise_overloaded(make_client, sleeps):
    server = FakeServer(*[error(429, "overloaded", "the queue is full", **{"Retry-After": "1"})] * 10)
    with pytest.raises(Overloaded, match="the queue is full") as info:
        make_client(server, max_retries=3).score(*prompts(1))
    assert len(server.requests) == 4 and len(sleeps) == 3
    assert info.value.status == 429 and info.value.attempts == 4 and "after 4 attempts" in str(info.value)


def test_exhausted_retries_raise_a_connection_error(make_client, sleeps):
    server = FakeServer(*[httpx.ConnectError("connection refused")] * 10)
    with pytest.raises(RewardConnectionError, match=r"no answer from .* after 3 attempts: ConnectError"):
        make_client(server, max_retries=2).score(*prompts(1))
    assert len(server.requests) == 3


def test_a_proxy_error_page_is_reported_with_its_text(make_client):
    server = FakeServer(*[httpx.Response(502, text="<html>Bad Gateway</html>")] * 2)
    with pytest.raises(RewardServerError, match="502 http_502: <html>Bad Gateway</html>") as info:
        make_client(server, max_retries=1).score(*prompts(1))
    assert len(server.requests) == 2 and type(info.value) is RewardServerError


def test_backoff_is_full_jitter_under_the_cap():
    settings = Settings.create(URL, api_key=None, timeout=1, max_retries=5, backoff=0.5, max_backoff=3.0,
                               chunk_size=1, max_concurrency=1, model=None)  # fmt: skip
    for retry, ceiling in enumerate([0.5, 1.0, 2.0, 3.0, 3.0, 3.0]):
        samples = [backoff_delay(settings, retry) for _ in range(200)]
        assert min(samples) >= 0 and max(samples) <= ceiling and max(samples) > ceiling / 2
    assert backoff_delay(settings, 10_000) <= 3.0
    state = RetryState(settings)
    assert state.delay_after(httpx.Response(422)) is None and state.attempts == 1


def test_retry_after_accepts_seconds_and_http_dates():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


# -- partial failures ----------------------------------------------------------------------------


def fail_chunk_holding(index: int) -> Callable[[httpx.Request], httpx.Response | None]:
    def answer(request: httpx.Request) -> httpx.Response | None:
        inputs = json.loads(request.content)["inputs"]
        if any(value_of(item) == index for item in inputs):
            return error(422, "invalid_input", f"input {index} is too long")
        return None

    return answer


def test_a_failed_chunk_fails_the_call_and_names_its_inputs(make_client):
    server = FakeServer(*[fail_chunk_holding(9)] * 5)
    with pytest.raises(InvalidRequest) as info:
        make_client(server, chunk_size=4, max_concurrency=2).score(*prompts(20))
    assert info.value.chunk == ChunkInfo(index=2, count=5, start=8, stop=12)
    assert str(info.value).startswith(
        "chunk 3 of 5 (inputs 8..11) failed, so the call returns no results: 422"
    )
    assert "input 9 is too long" in str(info.value)


def test_a_failure_after_retries_names_its_chunk_too(make_client):
    server = FakeServer(
        *[lambda r: error(503, "not_ready", "loading") if b'"p4"' in r.content else None] * 20
    )
    with pytest.raises(Overloaded, match=r"chunk 2 of 3 \(inputs 4\.\.7\)"):
        make_client(server, chunk_size=4, max_concurrency=1, max_retries=2).score(*prompts(12))


# -- headers, models, health ---------------------------------------------------------------------


def test_the_api_key_is_sent_as_a_bearer_token(make_client):
    server = FakeServer()
    make_client(server, api_key="s3cret").score(*prompts(1))
    make_client(server).score(*prompts(1))
    assert server.requests[0].headers["authorization"] == "Bearer s3cret"
    assert "authorization" not in server.requests[1].headers
    assert server.requests[0].headers["user-agent"] == f"rmserve-client/{rmserve_client.__version__}"


def test_models_health_and_ready(make_client):
    server = FakeServer()
    client = make_client(server, ["http://rm-0", "http://rm-1"])
    (info,) = client.models()
    assert (info.id, info.kind, info.heads, info.default, info.max_length) == (
        "llama",
        "dense",
        ["reward"],
        True,
        512,
    )
    assert info.aggregates[-1] == "tradeoff" and info.model_extra == {
        "object": "model",
        "architecture": "LlamaForSequenceClassification",
    }
    assert client.health() and client.ready()

    server = FakeServer(
        httpx.Response(200), httpx.ConnectError("refused"), error(503, "not_ready", "loading")
    )
    client = make_client(server, ["http://rm-0", "http://rm-1"])
    assert not client.health()
    assert not client.ready()


def test_replicas_serving_different_default_models_are_refused(make_client):
    server = FakeServer()
    server.script = [None, lambda r: FakeServer(model="qwen")(r)]
    with pytest.raises(RewardClientError, match="the base URLs serve different models; pass model="):
        make_client(server, ["http://rm-0", "http://rm-1"], chunk_size=1, max_concurrency=1).score(
            *prompts(2)
        )


def test_a_closed_client_says_so(make_client):
    client = make_client(FakeServer())
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.score(*prompts(1))


# -- TRL -----------------------------------------------------------------------------------------


def test_reward_func_scores_plain_strings_as_trl_does(make_client):
    # GRPOTrainer scores a standard-format example as the text prompt + completion, tokenized without
    # special tokens (no chat template)
    server = FakeServer()
    func = as_reward_func(make_client(server), model="llama")
    assert func.__name__ == "rmserve_llama"
    rewards = func(
        prompts=["t5", "t6"], completions=["0", "1"], completion_ids=[[1], [2]], trainer_state=None
    )
    assert rewards == [50.0, 61.0]
    assert server.bodies[0]["inputs"] == [
        {"text": "t50", "add_special_tokens": False},
        {"text": "t61", "add_special_tokens": False},
    ]


def test_reward_func_joins_conversational_prompts_and_completions(make_client):
    server = FakeServer()
    func = as_reward_func(make_client(server), aggregate="uwo", uwo_lambda=0.5)
    assert func.__name__ == "rmserve_uwo"
    conversation = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]
    rewards = func(
        [conversation, conversation], [[{"role": "assistant", "content": "m1"}], "m2"], task=["x", "y"]
    )
    assert rewards == [10.0, 20.0]  # the uwo aggregate (10 x reward in the fake), not rewards
    (body,) = server.bodies
    assert body["aggregates"] == ["uwo"] and body["uwo_lambda"] == 0.5
    assert body["inputs"][1]["messages"] == [*conversation, {"role": "assistant", "content": "m2"}]
    with pytest.raises(ValueError, match="got 1 prompts and 2 completions"):
        func(["p"], ["a", "b"])


def test_reward_func_can_turn_a_failure_into_none_rows(make_client, caplog):
    down = FakeServer(*[error(503, "shutting_down", "bye")] * 3)
    lenient = as_reward_func(make_client(down, max_retries=0), on_error="none")
    with caplog.at_level("WARNING", logger="rmserve_client"):
        assert lenient(["p1", "p2"], ["a", "b"]) == [None, None]  # TRL leaves these rows out
    assert "rmserve reward failed for 2 rows" in caplog.text
    strict = as_reward_func(make_client(down, max_retries=0))
    with pytest.raises(Overloaded, match="bye"):
        strict(["p1"], ["a"])
    with pytest.raises(ValueError, match="got 1 prompts and 2 completions"):
        lenient(["p"], ["a", "b"])  # a caller's mistake is not a server failure: it still raises
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'none'"):
        as_reward_func(make_client(down), on_error="skip")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_async_reward_funcs_run_concurrently_as_grpo_runs_them(sleeps):
    # GRPOTrainer gathers every async reward function on its loop: one failing (on_error="none") gives
    # None rows while the other still scores
    good = FakeServer(delay=lambda body: 0.05)
    bad = FakeServer(*[error(503, "shutting_down", "bye")] * 2)
    async with make_async(good, sleeps) as ok_client, make_async(bad, sleeps, max_retries=1) as bad_client:
        funcs = [
            as_async_reward_func(ok_client, name="ok"),
            as_async_reward_func(bad_client, on_error="none"),
        ]
        assert all(inspect.iscoroutinefunction(f) for f in funcs)
        started = time.perf_counter()
        results = await asyncio.gather(*(f(prompts=["t5", "t6"], completions=["0", "1"]) for f in funcs))
    assert results == [[50.0, 61.0], [None, None]]
    assert time.perf_counter() - started < 1.0


def test_a_run_name_is_sent_as_a_header_and_checked(make_client):
    server = FakeServer()
    make_client(server, run="ppo-7b/seed:1").score(*prompts(1))
    assert server.requests[0].headers["x-rmserve-run"] == "ppo-7b/seed:1"
    with pytest.raises(ValueError, match="must be 1 to 128 letters"):
        RewardClient(URL, run="has space")


# -- the async client ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_async_methods_send_the_same_payloads(sleeps):
    server = FakeServer()
    async with make_async(server, sleeps, model="m") as client:
        await client.score(["p1"], ["r"], aggregates=["min"], return_heads=True)
        await client.score_messages([[{"role": "user", "content": "m2"}]])
        await client.score_texts(["t3"])
        result = await client.score_ids([[4]])
    assert [b["inputs"] for b in server.bodies] == [
        [{"prompt": "p1", "response": "r"}],
        [{"messages": [{"role": "user", "content": "m2"}]}],
        [{"text": "t3"}],
        [{"input_ids": [4]}],
    ]
    assert server.bodies[0] == {
        "inputs": [{"prompt": "p1", "response": "r"}],
        "model": "m",
        "aggregates": ["min"],
        "return_heads": True,
    }
    assert result.rewards == [4.0] and result.model == "m"


@pytest.mark.anyio
async def test_async_chunks_are_concurrent_bounded_and_reassembled_in_order(sleeps):
    server = FakeServer(delay=lambda body: 0.002 * (60 - value_of(body["inputs"][0]) / 4))
    async with make_async(
        server, sleeps, ["http://rm-0", "http://rm-1"], chunk_size=4, max_concurrency=3
    ) as client:
        results = await asyncio.gather(
            client.score(*prompts(50)), client.score_texts([f"t{i}" for i in range(9)])
        )
    assert results[0].rewards == [float(i) for i in range(50)] and results[0].requests == 13
    assert results[1].rewards == [float(i) for i in range(9)]
    assert 2 <= server.max_in_flight <= 3  # the semaphore bounds both calls together
    assert server.finished != sorted(server.finished)
    assert hosts(server).count("rm-0") == hosts(server).count("rm-1") == 8


@pytest.mark.anyio
async def test_async_retries_429_503_and_connection_errors(sleeps):
    server = FakeServer(
        error(429, "overloaded", "queue full", **{"Retry-After": "1"}),
        httpx.ConnectError("refused"),
        error(503, "not_ready", "loading"),
    )
    async with make_async(server, sleeps, ["http://rm-0", "http://rm-1"]) as client:
        result = await client.score(*prompts(2))
    assert result.rewards == [0.0, 1.0] and result.requests == 4
    assert hosts(server) == ["rm-0", "rm-1", "rm-0", "rm-1"]
    assert len(sleeps) == 3 and 1.0 <= sleeps[0] <= 1.5


@pytest.mark.anyio
async def test_async_client_errors_are_not_retried_and_exhaustion_raises(sleeps):
    server = FakeServer(error(422, "invalid_input", "bad role"))
    async with make_async(server, sleeps) as client:
        with pytest.raises(InvalidRequest, match="bad role"):
            await client.score(*prompts(1))
    assert len(server.requests) == 1 and sleeps == []

    server = FakeServer(*[error(503, "shutting_down", "bye")] * 5)
    async with make_async(server, sleeps, max_retries=2) as client:
        with pytest.raises(Overloaded, match="bye"):
            await client.score(*prompts(1))
    assert len(server.requests) == 3

    server = FakeServer(*[httpx.ConnectError("refused")] * 5)
    async with make_async(server, sleeps, max_retries=1) as client:
        with pytest.raises(RewardConnectionError, match="after 2 attempts"):
            await client.score(*prompts(1))


@pytest.mark.anyio
async def test_async_partial_failure_names_the_chunk_and_cancels_the_rest(sleeps):
    server = FakeServer(
        *[fail_chunk_holding(0)] * 5, delay=lambda body: 0.0 if body["inputs"][0]["prompt"] == "p0" else 5
    )
    async with make_async(server, sleeps, chunk_size=2, max_concurrency=5) as client:
        started = time.monotonic()
        with pytest.raises(InvalidRequest) as info:
            await client.score(*prompts(10))
    assert time.monotonic() - started < 2, "the slow chunks were not cancelled"
    assert info.value.chunk == ChunkInfo(index=0, count=5, start=0, stop=2)


@pytest.mark.anyio
async def test_async_api_key_models_and_health(sleeps):
    server = FakeServer()
    async with make_async(server, sleeps, api_key="k") as client:
        assert [m.id for m in await client.models()] == ["llama"]
        assert await client.health() and await client.ready()
    assert all(r.headers["authorization"] == "Bearer k" for r in server.requests)

    async with make_async(FakeServer(httpx.ConnectError("refused")), sleeps) as client:
        assert not await client.health()


@pytest.mark.anyio
async def test_async_reward_func_is_a_coroutine_function_for_trl(sleeps):
    server = FakeServer()
    async with make_async(server, sleeps) as client:
        func = as_async_reward_func(client, name="helpfulness")
        assert inspect.iscoroutinefunction(func) and func.__name__ == "helpfulness"
        plain = await func(["t1", "t2"], ["0", "5"])
        chat = await func([[{"role": "user", "content": "q"}]], [[{"role": "assistant", "content": "m3"}]])
    assert plain == [10.0, 25.0] and chat == [3.0]
    assert server.bodies[0]["inputs"][0] == {"text": "t10", "add_special_tokens": False}
    assert server.bodies[1]["inputs"] == [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "m3"}]}
    ]
