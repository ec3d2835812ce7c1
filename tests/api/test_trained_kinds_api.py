"""The kinds rmserve trains (lora, branched) through the API: their model card, heads, sigmas and aggregates."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from rmserve.config import LoadOptions
from rmserve.models.loader import load_model
from rmserve.names import AGGREGATES
from rmserve.training.branches import BranchOptions, train_branches
from rmserve.training.lora import LoraSpec
from rmserve.training.pairs import read_preference_pairs
from rmserve.training.trainer import TrainOptions, train
from tests.api.app_client import serve

pytestmark = pytest.mark.anyio
INPUTS = [
    {"prompt": "How do I bake bread?", "response": "Mix flour, water, yeast and salt, then bake."},
    {"text": "already formatted text"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]},
]
OPTIONS = TrainOptions(trainable="top:1", epochs=1, lr=5e-3, batch_size=4, max_length=96)


@pytest.fixture(scope="module")
def trained(tiny_model_dirs, pairs_file, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trained-kinds")
    pairs = read_preference_pairs(pairs_file)
    train_pairs, held = pairs[:24], pairs[24:32]
    base = tiny_model_dirs["llama"]
    quiet = {"progress": False, "echo": lambda _: None}
    train(
        base, train_pairs, held, root / "lora", dataclasses.replace(OPTIONS, lora=LoraSpec(rank=2)), **quiet
    )
    train_branches(
        base, train_pairs, held, root / "brme", OPTIONS, BranchOptions(kind="brme", branches=2), **quiet
    )
    return {"lora": root / "lora", "brme": root / "brme"}


async def test_lora_and_branched_models_are_served_with_their_cards_and_every_aggregate(trained):
    options = LoadOptions(dtype="float32", device="cpu")
    models = [
        load_model("tiny-lora", trained["lora"], options),
        load_model("tiny-branched", trained["brme"], options),
    ]
    body = {"inputs": INPUTS, "aggregates": list(AGGREGATES), "return_heads": True}
    async with serve(models) as client:
        cards = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
        lora = await client.post("/v1/score", json=body | {"model": "tiny-lora"})
        branched = await client.post(
            "/v1/score", json=body | {"model": "tiny-branched", "tradeoff_scope": "request"}
        )
        sampled = await client.post(
            "/v1/score", json=body | {"model": "tiny-branched", "brme_sample": True, "brme_seed": 3}
        )
    assert cards["tiny-lora"]["kind"] == "lora" and cards["tiny-lora"]["heads"] == ["reward"]
    card = cards["tiny-branched"]
    assert (card["kind"], card["heads"], card["head_std"], card["reward"]) == (
        "branched",
        ["branch-0", "branch-1"],
        True,
        "tradeoff",
    )
    assert lora.status_code == 200 and len(lora.json()["rewards"]) == 3
    got = branched.json()
    assert branched.status_code == 200, branched.text
    assert (
        len(got["heads"][0]) == 2
        and len(got["head_std"][0]) == 2
        and set(got["aggregates"]) == set(AGGREGATES)
    )
    assert got["rewards"] == got["aggregates"]["tradeoff"]
    assert sampled.status_code == 200 and sampled.json()["brme_seed"] == 3
