"""The trainers' routes as their current code calls them: verl's SGLang mode (``/v1/embeddings``), SGLang's
native ``/classify``, waiting for room instead of 429 (verl and OpenRLHF retry no 429), and the API key in
the path for OpenRLHF (which sends no headers)."""

from __future__ import annotations

import asyncio
import base64
import logging
import struct

import pytest

from rmserve.models.base import reward_values
from rmserve.models.inputs import Text, TokenIds
from tests.api.app_client import serve
from tests.api.test_score_api import GatedModel

pytestmark = pytest.mark.anyio
QUERY = "<|im_start|>user\nhow do I bake bread?<|im_end|>\n<|im_start|>assistant\nMix flour and water, then bake.<|im_end|>"
OTHER = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello there<|im_end|>"
KEY = "trainer-key-0123456789"


def text_reward(model, text: str) -> float:
    return reward_values(model, [model.new_encoder().encode(Text(text=text))])[0]


async def test_verl_sglang_mode_reads_data_last_embedding_last(llama, tiny_model_dirs):
    # verl's reward loop, engine sglang: {"model": <its model path>, "input": <templated text>}
    body = {"model": str(tiny_model_dirs["llama"]), "input": QUERY}
    async with serve([llama]) as client:
        r = await client.post("/v1/embeddings", json=body)
        listed = await client.post("/v1/embeddings", json={"input": [QUERY, OTHER]})
        packed = await client.post("/v1/embeddings", json={"input": [QUERY], "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["object"] == "list" and got["model"] == "tiny-llama"
    assert got["data"] == [{"object": "embedding", "index": 0, "embedding": [pytest.approx(text_reward(llama, QUERY), abs=1e-5)]}]  # fmt: skip
    assert got["data"][-1]["embedding"][-1] == pytest.approx(text_reward(llama, QUERY), abs=1e-5)
    assert got["usage"]["prompt_tokens"] == got["usage"]["total_tokens"] > 0
    assert [d["embedding"][0] for d in listed.json()["data"]] == pytest.approx(
        [text_reward(llama, QUERY), text_reward(llama, OTHER)], abs=1e-5
    )
    (value,) = struct.unpack("<f", base64.b64decode(packed.json()["data"][0]["embedding"]))
    assert value == pytest.approx(got["data"][0]["embedding"][0], abs=1e-6)


async def test_sglang_native_classify_answers_in_sglangs_shape(llama):
    ids = list(llama.new_encoder().encode(Text(text=QUERY)).token_ids)
    reward = text_reward(llama, QUERY)
    async with serve([llama]) as client:
        one = (await client.post("/classify", json={"text": QUERY, "rid": "r-1"})).json()
        many = (await client.post("/classify", json={"text": [QUERY, OTHER]})).json()
        by_ids = (await client.post("/classify", json={"input_ids": ids})).json()
        id_lists = (await client.post("/classify", json={"input_ids": [ids, ids[:5]]})).json()
    assert one["embedding"] == [pytest.approx(reward, abs=1e-5)]
    assert one["meta_info"]["id"] == "r-1" and one["meta_info"]["prompt_tokens"] == len(ids)
    assert [m["embedding"][0] for m in many] == pytest.approx([reward, text_reward(llama, OTHER)], abs=1e-5)
    assert by_ids["embedding"][0] == pytest.approx(reward, abs=1e-5)
    short = reward_values(llama, [llama.new_encoder().encode(TokenIds(input_ids=ids[:5]))])[0]
    assert [m["embedding"][0] for m in id_lists] == pytest.approx([reward, short], abs=1e-5)
    assert [m["meta_info"]["prompt_tokens"] for m in id_lists] == [len(ids), 5]


@pytest.mark.parametrize(
    ("route", "body", "fragment"),
    [
        ("/v1/embeddings", {"input": []}, "input is an empty list"),
        ("/v1/embeddings", {"input": "hi", "dimensions": 4}, "a reward is one number"),
        ("/v1/embeddings", {"input": "hi", "encoding_format": "int8"}, "encoding_format"),
        ("/v1/embeddings", {"model": "nope", "input": "hi"}, "nope"),
        ("/classify", {"text": "hi", "input_ids": [1, 2]}, "either text or input_ids"),
        ("/classify", {"text": "hi", "image_data": "x.png"}, "image_data is not supported"),
        ("/classify", {"text": ["a", "b"], "rid": ["r"]}, "rid has 1 entries for 2 inputs"),
        ("/classify", {"prompt": "hi"}, "input"),  # neither vLLM's nor SGLang's body
        ("/classify", {"text": []}, "empty list"),
    ],
)
async def test_trainer_route_errors_say_how_to_fix_them(llama, route, body, fragment):
    async with serve([llama]) as client:
        r = await client.post(route, json=body)
    assert r.status_code in (404, 422), r.text
    assert fragment in r.json()["error"]["message"]


async def test_trainer_routes_wait_for_room_where_v1_score_answers_429(llama):
    gated = GatedModel(llama)
    gated.gate.clear()
    forty = [5] * 40
    async with serve([gated], max_queue_tokens=64, max_batch_size=1) as client:
        first = asyncio.create_task(client.post("/v1/score", json={"inputs": [{"input_ids": forty}]}))
        await asyncio.sleep(0.2)  # in the (blocked) forward
        second = asyncio.create_task(client.post("/v1/score", json={"inputs": [{"input_ids": forty}]}))
        await asyncio.sleep(0.2)  # queued: 40 of 64 tokens
        waiting = [
            asyncio.create_task(client.post("/get_reward", json={"query": [QUERY]})),
            asyncio.create_task(client.post("/classify", json={"input": [forty]})),
            asyncio.create_task(client.post("/v1/embeddings", json={"input": [forty]})),
            asyncio.create_task(client.post("/classify", json={"input_ids": forty})),
        ]
        await asyncio.sleep(0.2)
        assert not any(t.done() for t in waiting)  # waiting for room, not refused
        refused = await client.post("/v1/score", json={"inputs": [{"input_ids": [7] * 4}]})
        gated.gate.set()
        answers = await asyncio.gather(first, second, *waiting)
    assert refused.status_code == 429  # /v1/score keeps 429 + Retry-After, and jumps no line
    assert [a.status_code for a in answers] == [200] * 6


async def test_a_wait_for_room_ends_at_the_request_timeout(llama):
    gated = GatedModel(llama)
    gated.gate.clear()
    forty = [5] * 40
    async with serve([gated], max_queue_tokens=64, max_batch_size=1, request_timeout_s=0.5) as client:
        first = asyncio.create_task(client.post("/classify", json={"input": [forty]}))
        await asyncio.sleep(0.1)
        second = asyncio.create_task(client.post("/classify", json={"input": [forty]}))
        await asyncio.sleep(0.1)
        third = await client.post("/classify", json={"input": [forty]})  # waits, then times out
        gated.gate.set()
        await asyncio.gather(first, second)
    assert third.status_code == 504
    assert "request_timeout_s=0.5" in third.json()["error"]["message"]


async def test_openrlhf_puts_the_key_in_the_path(llama, caplog):
    async with serve([llama], api_key=f"{KEY},other-key-abcdefghij") as client:
        with caplog.at_level(logging.INFO, logger="rmserve"):
            ok = await client.post(f"/key/{KEY}/get_reward", json={"query": [QUERY]})
            embedded = await client.post(f"/key/{KEY}/v1/embeddings", json={"input": QUERY})
            wrong = await client.post("/key/not-a-key/get_reward", json={"query": [QUERY]})
            prefix = await client.post(f"/key/{KEY[:-1]}/get_reward", json={"query": [QUERY]})
            score = await client.post(f"/key/{KEY}/v1/score", json={"inputs": [{"text": QUERY}]})
            bare = await client.post("/get_reward", json={"query": [QUERY]})
    assert ok.status_code == 200, ok.text
    assert ok.json()["rewards"] == [pytest.approx(text_reward(llama, QUERY), abs=1e-5)]
    assert embedded.status_code == 200
    assert wrong.status_code == prefix.status_code == bare.status_code == 401
    assert wrong.json() == bare.json()
    assert score.status_code == 404
    assert "opens only the trainers' routes" in score.json()["error"]["message"]
    assert KEY not in score.text
    paths = [r.access["path"] for r in caplog.records if hasattr(r, "access")]
    assert paths == ["/get_reward", "/v1/embeddings", "/key/***/get_reward", "/key/***/get_reward",
                     "/key/***/v1/score", "/get_reward"]  # fmt: skip
    assert KEY[:-1] not in caplog.text


async def test_a_key_in_the_path_without_keys_set_is_refused_with_the_route_to_call(llama):
    async with serve([llama]) as client:
        r = await client.post("/key/anything/get_reward", json={"query": [QUERY]})
    assert r.status_code == 404
    assert "this server has no API key set: call the route without /key/<key>" in r.json()["error"]["message"]
