"""The exact-duplicate cache through the API: repeats are answered without a forward, with the same rewards."""

from __future__ import annotations

import pytest

from tests.api.app_client import serve

pytestmark = pytest.mark.anyio

A = {"prompt": "How do I bake bread?", "response": "Mix flour, water, yeast and salt, then bake."}
B = {"prompt": "How do I bake bread?", "response": "No."}


def counter(metrics: str, name: str) -> float:
    return sum(float(x.split()[-1]) for x in metrics.splitlines() if x.startswith(name + "{"))


async def test_repeats_are_answered_from_the_cache(llama):
    async with serve([llama], duplicate_cache_entries=0, prefix_min_tokens=0) as client:
        want = (await client.post("/v1/score", json={"inputs": [A, B, A]})).json()["rewards"]
        metrics = (await client.get("/metrics")).text
        assert counter(metrics, "rmserve_duplicate_cache_lookups_total") == 0
        computed_without_cache = counter(metrics, "rmserve_real_tokens_total")
    async with serve([llama], duplicate_cache_entries=16, prefix_min_tokens=0) as client:
        first = await client.post("/v1/score", json={"inputs": [A, B, A]})
        assert first.json()["rewards"] == pytest.approx(want, abs=1e-5)
        metrics = (await client.get("/metrics")).text
        # the repeat inside the request is computed once, and the usage still counts every input
        assert counter(metrics, "rmserve_real_tokens_total") < computed_without_cache
        assert first.json()["usage"]["input_tokens"] == computed_without_cache
        assert counter(metrics, "rmserve_duplicate_cache_hits_total") == 0
        again = await client.post("/v1/score", json={"inputs": [B, A], "aggregates": ["min"]})
        assert again.status_code == 200, again.text
        assert again.json()["rewards"] == pytest.approx([want[1], want[0]], abs=1e-5)
        metrics = (await client.get("/metrics")).text
        assert counter(metrics, "rmserve_duplicate_cache_hits_total") == 2
        assert counter(metrics, "rmserve_duplicate_cache_lookups_total") == 5
        # other lambdas are other outputs: looked up, not found
        other = await client.post("/v1/score", json={"inputs": [A], "uwo_lambda": 3.0})
        assert other.status_code == 200, other.text
        metrics = (await client.get("/metrics")).text
        assert counter(metrics, "rmserve_duplicate_cache_hits_total") == 2
