"""The kinds rmserve trains (lora, branched, dmoerm) through the API: their model card, heads, sigmas, aggregates,
and dmoerm's combined reward and routed categories."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from rmserve.config import LoadOptions, ModelSpec
from rmserve.models.inputs import INPUT_ADAPTER
from rmserve.models.loader import load_model
from rmserve.names import AGGREGATES
from rmserve.training.branches import BranchOptions, train_branches
from rmserve.training.dmoerm import DmoermOptions, train_dmoerm
from rmserve.training.lora import LoraSpec
from rmserve.training.pairs import read_preference_pairs
from rmserve.training.pipeline import split_pairs
from rmserve.training.ranked import read_ranked
from rmserve.training.trainer import TrainOptions, train
from tests.api.app_client import serve
from tests.tiny_models import PREFIXES, write_dmoerm_data

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
    items = read_ranked(write_dmoerm_data(root / "dmoerm.jsonl", categories=True))
    train_items, held_items = split_pairs(items, 0.2, 1)
    dmoerm = DmoermOptions(
        top=1, lora=LoraSpec(rank=2), phase1_lr=5e-3, expert_lr=5e-3, batch_size=4, max_length=128,
        mlp_epochs=3, router_epochs=300, router_lr=0.05, seed=1,
    )  # fmt: skip
    train_dmoerm(base, train_items, held_items, root / "dmoerm", dmoerm, **quiet)
    return {"lora": root / "lora", "brme": root / "brme", "dmoerm": root / "dmoerm"}


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


async def test_dmoerm_returns_its_combined_reward_the_experts_and_each_routed_category(trained):
    options = LoadOptions(dtype="float32", device="cpu")
    model = load_model("tiny-dmoerm", trained["dmoerm"], options)
    inputs = [
        {
            "prompt": PREFIXES["cooking"] + "How do I bake bread?",
            "response": "Mix flour and water, then bake.",
        },
        {"prompt": PREFIXES["pirate"] + "Where be the treasure?", "response": "Buried on the island, arr."},
    ]
    body = {"inputs": inputs, "aggregates": ["mean", "min"], "return_heads": True}
    async with serve([model]) as client:
        card = (await client.get("/v1/models")).json()["data"][0]
        got = await client.post("/v1/score", json=body)
        plain = await client.post("/v1/score", json={"inputs": inputs})
    assert (card["kind"], card["heads"], card["reward"], card["categories"]) == (
        "dmoerm",
        ["helpful", "brief"],
        "combined",
        ["cooking", "pirate"],
    )
    answer = got.json()
    assert got.status_code == 200, got.text
    assert answer["reward"] == "combined" and answer["categories"] == ["cooking", "pirate"]
    direct = model.score(model.new_encoder().encode_many(_inputs(inputs)), **_lambdas(2))
    assert direct.combined is not None
    assert answer["rewards"] == pytest.approx(direct.combined.tolist(), abs=1e-5)
    for row, want in zip(answer["heads"], direct.heads.tolist(), strict=True):
        assert row == pytest.approx(want, abs=1e-5)
    assert answer["aggregates"]["mean"] == pytest.approx([sum(h) / 2 for h in answer["heads"]], abs=1e-5)
    # without return_heads, no heads and no categories
    assert plain.json()["categories"] is None and plain.json()["heads"] is None


async def test_a_served_reward_can_be_an_aggregate_and_combined_is_refused_where_there_is_none(trained):
    options = LoadOptions(dtype="float32", device="cpu")
    dmoerm = load_model("tiny-dmoerm", trained["dmoerm"], options)
    spec = ModelSpec(name="tiny-dmoerm", path=str(trained["dmoerm"]), reward="min")
    async with serve([dmoerm], specs=[spec]) as client:
        got = (await client.post("/v1/score", json={"inputs": INPUTS[:1], "aggregates": ["min"]})).json()
    assert got["reward"] == "min" and got["rewards"] == got["aggregates"]["min"]
    lora = load_model("tiny-lora", trained["lora"], options)
    with pytest.raises(ValueError, match="reward: combined is a dmoerm model's own reward"):
        async with serve(
            [lora], specs=[ModelSpec(name="tiny-lora", path=str(trained["lora"]), reward="combined")]
        ):
            pass


def _inputs(rows: list[dict]) -> list:
    return [INPUT_ADAPTER.validate_python(row) for row in rows]


def _lambdas(n: int) -> dict:
    return {"uwo_lambda": torch.full((n,), 1.0), "tradeoff_lambda": torch.full((n,), 0.6)}
