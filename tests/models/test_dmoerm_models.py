"""DMoERM: ``rmserve train-dmoerm`` writes the model, and the served reward equals its offline composition.

Offline, per input, unbatched, float32: the router is ``router.safetensors`` applied to the mean of the
first category base's hidden states leaving the trunk (transformers' ``hidden_states[trunk_layers]``)
over the prompt's tokens; the routed category's experts are ``PeftModel.from_pretrained`` on that
category's base, each giving its score (its logits) and its final hidden state at the scored token; the
reward is the category's MLP (``mlp.safetensors`` in an ``nn.Sequential``) on those states, concatenated
in capability order. Served: one mixed batch whose inputs route to both categories, compared to 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification
from typer.testing import CliRunner

from rmserve.aggregation import aggregate_rows
from rmserve.cli import app
from rmserve.config import LoadOptions
from rmserve.memory.estimate import estimate_model
from rmserve.models.base import reward_column
from rmserve.models.dmoerm import MLP_FILE, ROUTER_FILE, DmoermRewardModel, aggregation_mlp
from rmserve.models.inputs import Messages, PromptResponse, Text
from rmserve.models.loader import load_model
from rmserve.models.lora import quiet_peft
from rmserve.training.ranked import read_ranked
from tests.tiny_models import DMOERM_ITEMS, PREFIXES, write_dmoerm_data

FP32_HF = LoadOptions(dtype="float32", device="cpu", pooling="hf")


def train(backbone: Path, data: Path, out: Path, *extra: str) -> str:
    result = CliRunner().invoke(
        app,
        ["train-dmoerm", "--model", str(backbone), "--data", str(data), "--out", str(out), "--top", "1",
         "--lora-rank", "4", "--lora-alpha", "8", "--expert-lr", "5e-3", "--phase1-lr", "5e-3", "--batch-size", "4",
         "--max-length", "128", "--mlp-epochs", "5", "--router-epochs", "300", "--router-lr", "0.05", "--seed", "1",
         *extra],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def two_categories(tiny_model_dirs, tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("dmoerm")
    data = write_dmoerm_data(root / "data.jsonl", categories=True)
    out = root / "model"
    return out, train(tiny_model_dirs["llama"], data, out)


@pytest.fixture(scope="module")
def one_category(tiny_model_dirs, tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("dmoerm-one")
    data = write_dmoerm_data(root / "data.jsonl", categories=False)
    out = root / "model"
    return out, train(tiny_model_dirs["llama"], data, out, "--capability", "helpful", "--category", "chat")


def inputs_of(categories: bool) -> list:
    ask = PREFIXES["cooking"] if categories else ""
    talk = PREFIXES["pirate"] if categories else ""
    return [
        PromptResponse(
            prompt=ask + "How do I bake bread?", response="Mix flour, water, yeast and salt, then bake."
        ),
        Messages(
            messages=[
                {"role": "user", "content": talk + "Tell me about the sea."},
                {"role": "assistant", "content": "Arr, the sea be wide and deep."},
            ]
        ),
        PromptResponse(prompt=talk + "What is 2+2?", response="4"),
        PromptResponse(prompt=ask + "What can I cook with eggs? " * 4, response="An omelette."),
        Text(text="a plain text " * 5),
    ]


def offline(
    folder: Path, served: DmoermRewardModel, items: list
) -> tuple[list[int], list[list[float]], list[float]]:
    """Routes, expert scores and rewards composed with transformers + peft + the MLP, one input at a time."""
    config = json.loads((folder / "rmserve.json").read_text())
    split, categories, capabilities = config["trunk_layers"], config["categories"], config["capabilities"]
    bases = {c: folder / "categories" / c / "base" for c in categories}
    first = AutoModelForSequenceClassification.from_pretrained(
        bases[categories[0]], dtype=torch.float32
    ).eval()
    router = load_file(folder / ROUTER_FILE) if len(categories) > 1 else None
    encoder = served.new_encoder()
    routes, heads, rewards = [], [], []
    for item in items:
        encoded = encoder.encode(item)
        ids = torch.tensor([encoded.token_ids])
        route = 0
        if router is not None:
            with torch.no_grad():
                trunk = first(input_ids=ids, output_hidden_states=True).hidden_states[split][0]  # (T, H)
            mean = trunk[: encoded.prompt_tokens].mean(dim=0)
            route = int((router["weight"] @ mean + router["bias"]).argmax())
        category = categories[route]
        finals, scores = [], []
        for capability in capabilities:
            model = AutoModelForSequenceClassification.from_pretrained(bases[category], dtype=torch.float32)
            with quiet_peft():
                expert = PeftModel.from_pretrained(
                    model, folder / "categories" / category / "experts" / capability
                )
            with torch.no_grad():
                result = expert.eval()(input_ids=ids, output_hidden_states=True)
            position = served.pooling.positions(ids, torch.tensor([ids.shape[1]]))[0]
            finals.append(
                result.hidden_states[-1][0, position]
            )  # the final norm's output at the scored token
            scores.append(float(result.logits[0, 0]))
        mlp = aggregation_mlp(len(capabilities), finals[0].shape[0])
        mlp.load_state_dict(load_file(folder / "categories" / category / MLP_FILE))
        with torch.no_grad():
            rewards.append(float(mlp(torch.cat(finals)[None])[0, 0]))
        routes.append(route)
        heads.append(scores)
    return routes, heads, rewards


def check_parity(folder: Path, items: list) -> DmoermRewardModel:
    served = load_model("d", folder, FP32_HF)
    assert isinstance(served, DmoermRewardModel)
    encoded = served.new_encoder().encode_many(items)
    n = len(encoded)
    out = served.score(encoded, uwo_lambda=torch.full((n,), 0.5), tradeoff_lambda=torch.full((n,), 0.4))
    routes, heads, rewards = offline(folder, served, items)
    assert out.routes is not None and out.routes.tolist() == routes
    torch.testing.assert_close(out.heads, torch.tensor(heads), atol=1e-4, rtol=0)
    torch.testing.assert_close(reward_column(out, "combined"), torch.tensor(rewards), atol=1e-4, rtol=0)
    nominal = torch.zeros(n, dtype=torch.long)
    torch.testing.assert_close(out.aggregates, aggregate_rows(out.heads, nominal, torch.full((n,), 0.5), torch.full((n,), 0.4)))  # fmt: skip
    return served


def test_two_categories_route_and_equal_the_offline_composition(two_categories):
    folder, output = two_categories
    for fragment in ("category cooking: phase 1 on", "category pirate", "expert helpful", "expert brief",
                     "router: held-out category accuracy", "dmoerm as served: held-out accuracy"):  # fmt: skip
        assert fragment in output, fragment
    served = check_parity(folder, inputs_of(categories=True))
    assert served.info.categories == ("cooking", "pirate")
    assert served.info.heads == ("helpful", "brief") and served.info.reward == "combined"
    # the mixed batch really went to both categories (the prefixes make the routing easy)
    encoded = served.new_encoder().encode_many(inputs_of(categories=True))
    out = served.score(encoded, uwo_lambda=torch.ones(len(encoded)), tradeoff_lambda=torch.ones(len(encoded)))
    assert out.routes is not None and out.routes[:4].tolist() == [0, 1, 1, 0]


def test_one_category_has_no_router_and_equals_the_offline_composition(one_category):
    folder, output = one_category
    assert not (folder / ROUTER_FILE).exists() and "router" not in output
    served = check_parity(folder, inputs_of(categories=False))
    assert served.info.categories == ("chat",) and served.info.heads == ("helpful",)


def test_the_folder_is_peft_and_transformers_formats_with_a_training_record(two_categories):
    folder, _ = two_categories
    expert = folder / "categories" / "cooking" / "experts" / "helpful"
    adapter = json.loads((expert / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (4, 8, 0.05)
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"] and adapter["layers_to_transform"] == [1]
    assert (folder / "categories" / "pirate" / "base" / "model.safetensors").is_file()
    mlp = load_file(folder / "categories" / "pirate" / MLP_FILE)
    hidden = mlp["0.bias"].shape[0]
    assert mlp["0.weight"].shape == (hidden, 2 * hidden) and mlp["1.weight"].shape == (1,)
    record = json.loads((folder / "training.json").read_text())
    assert record["command"] == "rmserve train-dmoerm"
    results = record["results"]
    assert (
        set(results["categories"]) == {"cooking", "pirate"} and 0 <= results["router_held_out_accuracy"] <= 1
    )
    cooking = results["categories"]["cooking"]
    assert {"phase_1", "phase_3", "experts", "items"} <= set(cooking)
    assert set(cooking["experts"]) == {"helpful", "brief"}
    assert 0 <= results["held_out"]["accuracy"] <= 1 and results["held_out"]["standard_error"] > 0
    assert record["options"]["lora"]["rank"] == 4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_memory_plan_sizes_the_weights_as_loaded(two_categories, dtype):
    folder, _ = two_categories
    options = LoadOptions(dtype=dtype, device="cpu")
    loaded = load_model("d", folder, options)
    planned = estimate_model("d", folder, options, max_batch_tokens=256, max_batch_size=8)
    assert planned.weights_bytes == loaded.info.weights_bytes


def test_ranked_lists_expand_to_weighted_pairs(tmp_path):
    data = write_dmoerm_data(tmp_path / "d.jsonl", categories=True)
    items = read_ranked(data)
    lists = [item for item in items if len(item.responses) == 3]
    assert len(lists) == 2 and len(items) == DMOERM_ITEMS + 2
    pairs = lists[0].pairs()
    assert len(pairs) == 3 and all(p.weight == pytest.approx(1 / 3) for p in pairs)
    assert pairs[0].chosen == lists[0].responses[0] and pairs[2].rejected == lists[0].responses[2]
    pair = next(item for item in items if item.capabilities.get("helpful") == "rejected")
    flipped = pair.capability_pair("helpful")
    assert flipped is not None and flipped.chosen == pair.responses[1]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"prompt": "p", "responses": ["a"]}, "two or more responses"),
        ({"prompt": "p", "responses": ["a", "b"], "capabilities": {"x": "chosen"}}, "give them on pairs"),
        (
            {"prompt": "p", "chosen": "a", "rejected": "b", "capabilities": {"x": "better"}},
            "chosen, rejected, tie",
        ),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "category": ""}, "non-empty string"),
        ({"prompt": "p", "chosen": ["a"], "rejected": "b"}, "all strings or all message lists"),
    ],
)
def test_bad_lines_are_refused_with_the_line_and_the_shapes(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(line) + "\n"
    )
    with pytest.raises(ValueError, match=r"bad\.jsonl:2") as caught:
        read_ranked(path)
    assert message in str(caught.value)


def test_train_dmoerm_refuses_what_it_cannot_do(tiny_model_dirs, tmp_path):
    data = write_dmoerm_data(tmp_path / "d.jsonl", categories=False)
    unlabelled = tmp_path / "u.jsonl"
    unlabelled.write_text(
        "".join(json.dumps({"prompt": "p", "chosen": "a", "rejected": f"b{i}"}) + "\n" for i in range(8))
    )
    mixed = tmp_path / "m.jsonl"
    lines = data.read_text().splitlines()
    mixed.write_text(
        json.dumps(json.loads(lines[0]) | {"category": "x"}) + "\n" + "\n".join(lines[1:]) + "\n"
    )
    base = ["train-dmoerm", "--model", str(tiny_model_dirs["llama"]), "--out", str(tmp_path / "x")]
    for extra, message in (
        (["--data", str(unlabelled)], "no capability labels"),
        (["--data", str(mixed)], "have a 'category' and the rest do not"),
        (["--data", str(data), "--capability", "witty"], "no training pair labelled for capability 'witty'"),
        (["--data", str(data), "--phase1-share", "1"], "--phase1-share must lie in (0, 1)"),
    ):
        result = CliRunner().invoke(app, [*base, *extra])
        assert result.exit_code == 2 and message in result.output, (extra, result.output)


def test_train_dmoerm_never_writes_into_a_folder_that_holds_files(tiny_model_dirs, tmp_path):
    data = write_dmoerm_data(tmp_path / "d.jsonl", categories=False)
    out = tmp_path / "x"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(
        app,
        ["train-dmoerm", "--model", str(tiny_model_dirs["llama"]), "--data", str(data), "--out", str(out)],
    )
    assert result.exit_code == 2 and "exists and is not empty" in result.output, result.output
    assert (out / "keep.txt").read_text() == "mine"
