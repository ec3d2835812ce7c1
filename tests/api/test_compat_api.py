"""OpenRLHF's /get_reward and vLLM's /classify and /pooling, with the payloads those clients send."""

from __future__ import annotations

import asyncio
import math

import pytest

from rmserve.api.deps import TIMING_HEADERS
from rmserve.api.openrlhf import strip_padding
from rmserve.models.base import reward_values
from rmserve.models.inputs import Text, TokenIds
from tests.api.app_client import serve

QUERY = "<|im_start|>user\nhow do I bake bread?<|im_end|>\n<|im_start|>assistant\nMix flour and water, then bake.<|im_end|>"
OTHER = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello there<|im_end|>"

pytestmark = pytest.mark.anyio


def text_reward(model, text: str) -> float:
    return reward_values(model, [model.new_encoder().encode(Text(text=text))])[0]


async def test_openrlhf_payload_returns_rewards_scores_and_logs(llama):
    body = {"query": [QUERY, OTHER], "prompts": ["how do I bake bread?", "hi"], "labels": ["", ""]}
    async with serve([llama]) as client:
        r = await client.post("/get_reward", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    expected = [text_reward(llama, QUERY), text_reward(llama, OTHER)]
    assert got["rewards"] == pytest.approx(expected, abs=1e-5)
    assert got["scores"] == got["rewards"]
    assert got["extra_logs"] == {}


async def test_openrlhf_single_query_requests_from_many_workers_are_batched(llama):
    async with serve([llama], max_wait_ms=50) as client:
        replies = await asyncio.gather(
            *(client.post("/get_reward", json={"query": [QUERY]}) for _ in range(12))
        )
        metrics = (await client.get("/metrics")).text
    assert [r.json()["rewards"][0] for r in replies] == pytest.approx(
        [text_reward(llama, QUERY)] * 12, abs=1e-5
    )
    batches = sum(
        float(x.split()[-1]) for x in metrics.splitlines() if x.startswith("rmserve_batches_total{")
    )
    assert batches < 12


async def test_openrlhf_padded_queries_score_as_unpadded(llama):
    pad = "<|im_end|>"  # the tiny llama pads with its EOS, like SmolLM2
    async with serve([llama]) as client:
        got = (await client.post("/get_reward", json={"query": [pad * 2 + QUERY + pad * 3, QUERY]})).json()
    assert got["rewards"][0] == pytest.approx(got["rewards"][1], abs=1e-6)


def test_strip_padding_keeps_one_eos_when_pad_is_eos():
    assert strip_padding("<p><p>abc<p><p>", "<p>", "<e>") == "abc"
    assert strip_padding("abc<e><e>", "<e>", "<e>") == "abc<e>"
    assert strip_padding("abc<e>", "<e>", "<e>") == "abc<e>"
    assert strip_padding("abc", None, "<e>") == "abc"


async def test_openrlhf_multi_head_model_logs_aggregates_and_heads(brme):
    async with serve([brme]) as client:
        got = (await client.post("/get_reward", json={"query": [QUERY, OTHER]})).json()
    logs = got["extra_logs"]
    assert set(logs) == {"mean", "min", "max", "std", "uwo", "nominal", "tradeoff"} | {
        f"head/head{i}" for i in range(5)
    }
    assert got["rewards"] == logs["tradeoff"]  # brme serves tradeoff
    assert all(len(v) == 2 for v in logs.values())
    assert logs["min"][0] == pytest.approx(min(logs[f"head/head{i}"][0] for i in range(5)))


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"query": [QUERY], "prompts": ["a", "b"]}, "prompts has 2 entries but query has 1"),
        ({"query": [], "prompts": ["a"]}, "prompts has 1 entries but query has 0"),
        ({"prompts": ["a"]}, "query"),
    ],
)
async def test_openrlhf_bad_payloads_get_422(llama, body, fragment):
    async with serve([llama]) as client:
        r = await client.post("/get_reward", json=body)
    assert r.status_code == 422 and fragment in r.json()["error"]["message"]


async def test_verl_classify_payload_reads_raw_reward_at_data_last_probs_last(llama):
    body = {"model": "tiny-llama", "input": QUERY, "activation": False}  # verl's reward loop
    async with serve([llama]) as client:
        r = await client.post("/classify", json=body)
        aliased = await client.post("/v1/classify", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["object"] == "list" and got["model"] == "tiny-llama" and got["id"].startswith("classify-")
    assert got["data"][-1]["probs"][-1] == pytest.approx(text_reward(llama, QUERY), abs=1e-5)
    assert got["data"][0]["num_classes"] == 1 and got["data"][0]["index"] == 0
    assert got["usage"]["prompt_tokens"] == got["usage"]["total_tokens"] > 0
    assert aliased.json()["data"] == got["data"]


async def test_classify_activation_lists_token_ids_and_truncation(llama):
    ids = list(llama.new_encoder().encode(Text(text=QUERY)).token_ids)
    reward = text_reward(llama, QUERY)
    async with serve([llama]) as client:
        activated = (await client.post("/classify", json={"input": QUERY, "use_activation": True})).json()
        listed = (await client.post("/classify", json={"input": [QUERY, OTHER]})).json()
        by_ids = (await client.post("/classify", json={"input": ids})).json()
        id_lists = (await client.post("/classify", json={"input": [ids, ids[:5]]})).json()
        truncated = (await client.post("/classify", json={"input": ids, "truncate_prompt_tokens": 6})).json()
        pooled = (await client.post("/pooling", json={"input": [QUERY, OTHER]})).json()
    assert activated["data"][0]["probs"][0] == pytest.approx(1 / (1 + math.exp(-reward)), abs=1e-6)
    assert [d["probs"][0] for d in listed["data"]] == pytest.approx(
        [reward, text_reward(llama, OTHER)], abs=1e-5
    )
    assert by_ids["data"][0]["probs"][0] == pytest.approx(reward, abs=1e-5)
    short = reward_values(llama, [llama.new_encoder().encode(TokenIds(input_ids=ids[:5]))])[0]
    assert [d["probs"][0] for d in id_lists["data"]] == pytest.approx([reward, short], abs=1e-5)
    # left truncation to 6 tokens keeps the leading special token, like "truncation": "left"
    kept = [ids[0], *ids[-5:]]
    assert truncated["data"][0]["probs"][0] == pytest.approx(
        reward_values(llama, [llama.new_encoder().encode(TokenIds(input_ids=kept))])[0], abs=1e-5
    )
    assert truncated["usage"]["prompt_tokens"] == 6
    assert pooled["id"].startswith("pool-") and [d["object"] for d in pooled["data"]] == [
        "pooling",
        "pooling",
    ]
    assert [d["data"] for d in pooled["data"]] == [[d["probs"][0]] for d in listed["data"]]


@pytest.mark.parametrize(
    ("route", "body", "status"),
    [
        ("/classify", {"model": "nope", "input": "hi"}, 404),
        ("/pooling", {"input": []}, 422),
        ("/classify", {"input": "hi", "truncate_prompt_tokens": 0}, 422),
        ("/get_reward", {"query": ["hi"], "model": "nope"}, 404),
        ("/get_reward", {"query": ["hi", ""]}, 422),  # found by the schemathesis run: was a 500
        ("/classify", {"input": ""}, 422),
        ("/pooling", {"input": [3, -1]}, 422),
    ],
)
async def test_compat_errors(llama, route, body, status):
    async with serve([llama]) as client:
        r = await client.post(route, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]


async def test_openrlhf_empty_query_for_a_server_left_without_a_share(llama, brme):
    # OpenRLHF with several reward URLs splits each batch across them and sends the rest an empty query
    async with serve([llama, brme]) as client:
        dense = await client.post("/get_reward", json={"query": [], "prompts": [], "labels": []})
        multi = await client.post("/get_reward", json={"query": [], "model": "tiny-brme"})
        full = await client.post("/get_reward", json={"query": [QUERY], "model": "tiny-brme"})
    assert dense.status_code == 200, dense.text
    assert dense.json() == {"rewards": [], "scores": [], "extra_logs": {}}
    assert multi.status_code == 200, multi.text
    # the same extra_logs keys as an answer with queries, so the trainer's logs line up
    assert multi.json()["rewards"] == [] and set(multi.json()["extra_logs"]) == set(full.json()["extra_logs"])
    assert all(v == [] for v in multi.json()["extra_logs"].values())


async def test_verl_sends_its_local_model_path_as_the_model(llama, brme, tiny_model_dirs):
    # verl's reward loop posts {"model": <its model path>, ...} to /classify and never retries a 4xx
    folder = tiny_model_dirs["llama"]
    async with serve([brme, llama]) as client:
        by_path = await client.post("/classify", json={"model": str(folder), "input": [QUERY]})
        with_slash = await client.post("/classify", json={"model": f"{folder}/", "input": [QUERY]})
        other = await client.post("/classify", json={"model": "/models/not-served", "input": [QUERY]})
        cards = {c["id"]: c for c in (await client.get("/v1/models")).json()["data"]}
    assert by_path.status_code == 200, by_path.text
    assert by_path.json()["model"] == "tiny-llama"
    assert by_path.json()["data"][0]["probs"][0] == pytest.approx(text_reward(llama, QUERY), abs=1e-5)
    assert with_slash.json()["model"] == "tiny-llama"
    assert other.status_code == 404
    assert "or the path of a served model's folder" in other.json()["error"]["message"]
    assert cards["tiny-llama"]["aliases"] == [str(folder)]


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/score", {"inputs": [{"text": QUERY}]}),
        ("/get_reward", {"query": [QUERY]}),
        ("/get_reward", {"query": []}),
        ("/classify", {"input": QUERY}),
        ("/v1/classify", {"input": [QUERY, OTHER]}),
        ("/pooling", {"input": QUERY}),
        ("/v1/pooling", {"input": [[1, 2, 3]]}),
        ("/v1/embeddings", {"input": QUERY}),
        ("/classify", {"text": [QUERY]}),
    ],
)
async def test_every_scoring_route_sends_the_timing_headers(llama, route, body):
    async with serve([llama]) as client:
        r = await client.post(route, json=body)
    assert r.status_code == 200, r.text
    timings = {name: float(r.headers[name]) for name in TIMING_HEADERS}
    assert all(value >= 0 for value in timings.values())
    assert timings["x-total-time"] >= timings["x-inference-time"]
    if route != "/get_reward" or body["query"]:
        assert timings["x-inference-time"] > 0
