"""Prefix sharing through the API: GRPO-shaped requests score as without sharing, and the metric counts the reuse."""

from __future__ import annotations

import asyncio

import pytest

from rmserve.config import ModelSpec
from tests.api.app_client import serve
from tests.prefix_batches import PROMPT

pytestmark = pytest.mark.anyio

RESPONSES = [
    "Once upon a time.",
    "No.",
    "The cat " * 9,
    "It slept in a box.",
    "Fish!",
    "A very long tale. " * 4,
]


def reused(metrics: str) -> float:
    lines = [x for x in metrics.splitlines() if x.startswith("rmserve_prefix_tokens_reused_total{")]
    return sum(float(x.split()[-1]) for x in lines)


async def test_one_request_per_group_and_one_per_response_score_as_without_sharing(llama):
    group = [{"prompt": PROMPT, "response": r} for r in RESPONSES]
    async with serve([llama], prefix_min_tokens=0) as client:
        r = await client.post("/v1/score", json={"inputs": group})
        assert r.status_code == 200, r.text
        want = r.json()["rewards"]
        assert reused((await client.get("/metrics")).text) == 0
    async with serve([llama], prefix_min_tokens=16, max_wait_ms=200, duplicate_cache_entries=0) as client:
        r = await client.post("/v1/score", json={"inputs": group})
        assert r.status_code == 200, r.text
        assert r.json()["rewards"] == pytest.approx(want, abs=1e-4)
        after_group = reused((await client.get("/metrics")).text)
        assert after_group > 0
        # one request per response, sent together: the batcher groups them by their prefix
        answers = await asyncio.gather(*(client.post("/v1/score", json={"inputs": [x]}) for x in group))
        assert [a.json()["rewards"][0] for a in answers] == pytest.approx(want, abs=1e-4)
        assert reused((await client.get("/metrics")).text) > after_group


async def test_a_models_own_setting_wins_over_the_servers(llama):
    group = [{"prompt": PROMPT, "response": r} for r in RESPONSES]
    for own, server, shares in ((0, 16, False), (16, 0, True)):
        specs = [ModelSpec(name="tiny-llama", path="unused", prefix_min_tokens=own)]
        async with serve([llama], specs=specs, prefix_min_tokens=server) as client:
            assert (await client.post("/v1/score", json={"inputs": group})).status_code == 200
            assert (reused((await client.get("/metrics")).text) > 0) is shares
