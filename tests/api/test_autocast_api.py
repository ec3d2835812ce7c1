"""bfloat16 autocast serving: float32 weights, bfloat16 matmuls, rewards close to float32's; refused for bf16 weights."""

from __future__ import annotations

import pytest

from rmserve.config import LoadOptions, Settings
from rmserve.models.dense import DenseRewardModel
from rmserve.scoring.registry import ModelRegistry
from tests.api.app_client import serve

pytestmark = pytest.mark.anyio

INPUTS = [
    {"prompt": "How do I bake bread?", "response": "Mix flour, water, yeast and salt, then bake."},
    {"prompt": "Tell me a story.", "response": "Once upon a time there was a cat who liked boxes. " * 3},
]


async def test_autocast_rewards_are_close_to_float32_and_the_model_says_how_it_runs(llama):
    async with serve([llama], duplicate_cache_entries=0) as client:
        want = (await client.post("/v1/score", json={"inputs": INPUTS})).json()["rewards"]
    async with serve([llama], autocast=True, duplicate_cache_entries=0) as client:
        r = await client.post("/v1/score", json={"inputs": INPUTS})
        models = (await client.get("/v1/models")).json()["data"]
    assert r.status_code == 200, r.text
    got = r.json()["rewards"]
    assert got == pytest.approx(want, abs=0.05)
    assert got != pytest.approx(want, abs=1e-6)  # the matmuls really ran in bfloat16
    assert models[0]["dtype"] == "float32 (bfloat16 autocast)"


def test_autocast_is_refused_for_bfloat16_weights(tiny_model_dirs):
    model = DenseRewardModel("bf16", tiny_model_dirs["llama"], LoadOptions(dtype="bfloat16", device="cpu"))
    with pytest.raises(ValueError, match="autocast runs a float32 model's matmuls in bfloat16"):
        ModelRegistry.from_models([model], Settings(autocast=True))
