"""End-to-end: rmserve_client against a real uvicorn server on 127.0.0.1 with a tiny llama.

The tiny llama's tokenizer is ChatML without BOS, so the four input forms of one dialogue (prompt and
response, messages, the ChatML text, its token ids) are the same tokens and must score the same.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rmserve.launch import CLEAN_EXIT, start_server
from rmserve_client import (
    AsyncRewardClient,
    InvalidRequest,
    ModelNotFound,
    RewardClient,
    as_async_reward_func,
    as_reward_func,
)

PROMPTS = [f"Question {i}: what is {i} plus {i}?" for i in range(600)]
RESPONSES = [f"It is {2 * i}. " * (1 + i % 5) for i in range(600)]
AGGREGATES = ["mean", "min", "max", "std", "uwo", "nominal", "tradeoff"]


def chatml(prompt: str, response: str) -> str:
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{response}<|im_end|>"


def conversation(prompt: str, response: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


@pytest.fixture(scope="module")
def server(tiny_model_dirs, tmp_path_factory):
    srv = start_server(
        ["--model", str(tiny_model_dirs["llama"]), "--dtype", "float32", "--max-wait-ms", "5"],
        tmp_path_factory.mktemp("logs") / "server.log",
    )
    yield srv
    assert srv.stop() == CLEAN_EXIT, srv.log_text()


@pytest.fixture(scope="module")
def client(server):
    with RewardClient(server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def reference(server):
    """The rewards of the 600 dialogues, in one request."""
    with RewardClient(server.url, chunk_size=len(PROMPTS), timeout=60) as client:
        result = client.score(PROMPTS, RESPONSES)
    assert result.requests == 1
    return result


def test_a_chunked_call_equals_one_request_in_input_order(server, reference):
    with RewardClient(server.url, chunk_size=64, max_concurrency=4, timeout=60) as chunked:
        result = chunked.score(PROMPTS, RESPONSES)
    assert result.requests == 10  # 600 / 64, rounded up
    assert result.model == "llama" and result.reward == "mean"
    assert result.rewards == pytest.approx(reference.rewards, abs=1e-4)
    assert result.truncated == reference.truncated
    assert result.input_tokens == reference.input_tokens
    assert len(set(reference.rewards)) > 500, "the dialogues should score differently"


def test_the_four_input_forms_score_alike(client, tiny_model_dirs, reference):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    texts = [chatml(p, r) for p, r in zip(PROMPTS[:20], RESPONSES[:20], strict=True)]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    by_messages = client.score_messages(
        [conversation(p, r) for p, r in zip(PROMPTS[:20], RESPONSES[:20], strict=True)]
    )
    by_text = client.score_texts(texts)
    by_ids = client.score_ids(ids)
    for result in (by_messages, by_text, by_ids):
        assert result.rewards == pytest.approx(reference.rewards[:20], abs=1e-4)
    assert by_ids.input_tokens == sum(len(i) for i in ids) == by_text.input_tokens


def test_aggregates_of_a_dense_model_equal_its_reward(client, reference):
    result = client.score(PROMPTS[:30], RESPONSES[:30], aggregates=AGGREGATES, return_heads=True)
    assert sorted(result.aggregates) == sorted(AGGREGATES)
    for name in ("mean", "min", "max", "uwo", "nominal", "tradeoff"):  # one head: each is the reward
        assert result.aggregates[name] == pytest.approx(reference.rewards[:30], abs=1e-4), name
    assert result.aggregates["std"] == [0.0] * 30
    assert result.heads is not None and [h[0] for h in result.heads] == pytest.approx(result.rewards)


def test_models_health_and_ready(client):
    (model,) = client.models()
    assert (model.id, model.kind, model.default, model.reward) == ("llama", "dense", True, "mean")
    assert set(model.aggregates) == set(AGGREGATES) and model.max_length is not None
    assert client.health() and client.ready()


def test_server_errors_arrive_as_typed_exceptions(server):
    with RewardClient(server.url, chunk_size=2) as client:
        with pytest.raises(ModelNotFound, match="404 model_not_found"):
            client.score(["a"], ["b"], model="no-such-model")
        with pytest.raises(
            InvalidRequest, match=r"chunk 2 of 2 \(inputs 2\.\.3\).*outside this model's vocabulary"
        ) as info:
            client.score_ids([[1], [2], [3], [10**6]])
    assert info.value.status == 422 and info.value.attempts == 1


def grpo_trainer_rewards(folder, prompts: list[str], completions: list[str]) -> list[float]:
    """What TRL's GRPOTrainer computes for a plain-string (standard format) batch with a reward model of
    its own: the texts prompt + completion, tokenized without special tokens, right-padded, one forward."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    texts = [p + c for p, c in zip(prompts, completions, strict=True)]
    inputs = tokenizer(
        text=texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False
    )
    with torch.no_grad():
        return model(**inputs).logits[:, 0].tolist()


def test_trl_reward_functions(client, server, reference, tiny_model_dirs):
    plain = as_reward_func(client)
    assert plain.__name__ == "rmserve"
    got = plain(PROMPTS[:8], RESPONSES[:8], completion_ids=None)
    assert got == pytest.approx(
        grpo_trainer_rewards(tiny_model_dirs["llama"], PROMPTS[:8], RESPONSES[:8]), abs=1e-4
    )
    # not the chat-templated pair, which GRPOTrainer uses only for conversational examples
    assert min(abs(a - b) for a, b in zip(got, reference.rewards[:8], strict=True)) > 1e-3
    chat = as_reward_func(client, aggregate="uwo", name="rm_uwo")
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS[:8]]
    completions = [[{"role": "assistant", "content": r}] for r in RESPONSES[:8]]
    assert chat(prompts, completions) == pytest.approx(reference.rewards[:8], abs=1e-4)

    async def run() -> list[float]:
        async with AsyncRewardClient(server.url) as async_client:
            return await as_async_reward_func(async_client)(prompts, completions)

    assert asyncio.run(run()) == pytest.approx(reference.rewards[:8], abs=1e-4)


def test_the_async_client_runs_calls_concurrently(server, reference):
    async def run() -> list:
        async with AsyncRewardClient(server.url, chunk_size=32, max_concurrency=6, timeout=60) as client:
            return await asyncio.gather(
                client.score(PROMPTS[:300], RESPONSES[:300]),
                client.score(PROMPTS[300:], RESPONSES[300:]),
                client.score_texts([chatml(p, r) for p, r in zip(PROMPTS[:50], RESPONSES[:50], strict=True)]),
            )

    first, second, texts = asyncio.run(run())
    assert (first.requests, second.requests, texts.requests) == (10, 10, 2)
    assert first.rewards + second.rewards == pytest.approx(reference.rewards, abs=1e-4)
    assert texts.rewards == pytest.approx(reference.rewards[:50], abs=1e-4)
