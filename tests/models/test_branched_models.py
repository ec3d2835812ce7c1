"""Branched models: ``rmserve train-branches`` writes them, and each served branch equals transformers (+ peft).

Per branch, offline: the base classifier with the branch's weights (``branch.safetensors`` loaded into it,
or the branch's adapter through ``PeftModel.from_pretrained``), run unbatched by transformers, plus the
branch's offset; sigma from its final hidden state at the scored token. Served: one mixed-length batch,
float32, compared to 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification
from typer.testing import CliRunner

from rmserve.aggregation import aggregate_rows, brme_nominal_index
from rmserve.cli import app
from rmserve.config import LoadOptions
from rmserve.models.branched import BRANCH_WEIGHTS, HEAD_FILE, BranchedRewardModel, branch_cost
from rmserve.models.inputs import PromptResponse, Text
from rmserve.models.loader import load_model
from rmserve.models.lora import quiet_peft
from rmserve.training.branches import branch_shares
from tests.prefix_batches import check_prefix_parity, shared_prompt_inputs

INPUTS = [
    PromptResponse(prompt="How do I bake bread?", response="Mix flour, water, yeast and salt, then bake."),
    Text(text="Human: hi there\n\nAssistant: Hello! How can I help you today?"),
    PromptResponse(prompt="What is 2+2?", response="4"),
    Text(text="a much longer text " * 12),
]
FP32_HF = LoadOptions(dtype="float32", device="cpu", pooling="hf")


def run(base: Path, pairs: Path, out: Path, *extra: str) -> str:
    result = CliRunner().invoke(
        app,
        ["train-branches", "--model", str(base), "--data", str(pairs), "--out", str(out), "--train", "top:1",
         "--branches", "3", "--lr", "5e-3", "--batch-size", "4", "--max-length", "128", "--eval-fraction", "0.25",
         *extra],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def full_multihead(tiny_model_dirs, pairs_file, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("branched") / "full"
    return out, run(tiny_model_dirs["llama"], pairs_file, out)


@pytest.fixture(scope="module")
def lora_brme(tiny_model_dirs, pairs_file, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("branched") / "lora"
    return out, run(tiny_model_dirs["llama"], pairs_file, out, "--kind", "brme", "--lora-rank", "4")


def offline_branch(folder: Path, branch: str, base: Path, form: str) -> torch.nn.Module:
    model = AutoModelForSequenceClassification.from_pretrained(base, dtype=torch.float32)
    if form == "lora":
        with quiet_peft():
            return PeftModel.from_pretrained(model, folder / branch).eval()
    state = load_file(folder / branch / BRANCH_WEIGHTS)
    assert set(state) <= set(model.state_dict())
    model.load_state_dict(state, strict=False)
    return model.eval()


def check_parity(folder: Path, base: Path, form: str) -> None:
    served = load_model("b", folder, FP32_HF)
    assert isinstance(served, BranchedRewardModel) and served.info.kind == "branched"
    encoded = served.new_encoder().encode_many(INPUTS)
    n = len(encoded)
    out = served.score(encoded, uwo_lambda=torch.full((n,), 0.5), tradeoff_lambda=torch.full((n,), 0.4))
    config = json.loads((folder / "rmserve.json").read_text())
    for i, branch in enumerate(config["branches"]):
        model = offline_branch(folder, branch, base, form)
        head = load_file(folder / branch / HEAD_FILE)
        for row, item in enumerate(encoded):
            ids = torch.tensor([item.token_ids])
            with torch.no_grad():
                result = model(input_ids=ids, output_hidden_states=True)
            want = float(result.logits[0, 0]) + float(head["bias"][0])
            assert float(out.heads[row, i]) == pytest.approx(want, abs=1e-4), (branch, row)
            if "std_weight" in head:
                position = served.pooling.positions(ids, torch.tensor([ids.shape[1]]))[0]
                h = result.hidden_states[-1][0, position]  # the final norm's output at the scored token
                sigma = F.softplus(h @ head["std_weight"][0] + head["std_bias"][0]) + config["eps"]
                assert float(out.head_std[row, i]) == pytest.approx(float(sigma), abs=1e-4)
    # the aggregates are the usual ones over the branches
    nominal = (
        brme_nominal_index(out.head_std) if out.head_std is not None else torch.zeros(n, dtype=torch.long)
    )
    want = aggregate_rows(out.heads, nominal, torch.full((n,), 0.5), torch.full((n,), 0.4))
    torch.testing.assert_close(out.aggregates, want)
    # the branches really differ
    assert float(out.heads.std(dim=1).min()) > 1e-4


def test_full_multihead_branches_each_equal_transformers_on_that_branch(full_multihead, tiny_model_dirs):
    folder, output = full_multihead
    for fragment in (
        "branch 1 of 3: 15 pairs",
        "branch 3 of 3",
        "pairwise accuracy on 10 pairs",
        "mean",
        "uwo",
    ):
        assert fragment in output
    config = json.loads((folder / "rmserve.json").read_text())
    assert (config["form"], config["head_kind"], config["trunk_layers"], config["nominal_head"]) == (
        "full",
        "multihead",
        1,
        0,
    )
    # a branch holds its top layer, final norm and head, nothing of the trunk
    names = set(load_file(folder / "branch-0" / BRANCH_WEIGHTS))
    assert names and all(n.startswith(("model.layers.1.", "model.norm.", "score.")) for n in names)
    check_parity(folder, tiny_model_dirs["llama"], "full")


def test_lora_brme_branches_each_equal_peft_on_that_branch(lora_brme, tiny_model_dirs):
    folder, _ = lora_brme
    config = json.loads((folder / "rmserve.json").read_text())
    assert (config["form"], config["head_kind"], config["nominal_head"]) == ("lora", "brme", None)
    assert (folder / "branch-2" / "adapter_config.json").is_file()
    check_parity(folder, tiny_model_dirs["llama"], "lora")
    served = load_model("b", folder, LoadOptions(dtype="float32", device="cpu"))
    assert served.info.has_std and served.info.heads == ("branch-0", "branch-1", "branch-2")
    assert (
        served.info.reward == "tradeoff" and "3 lora branches of 1 layers (brme)" in served.info.architecture
    )


def test_the_training_record_has_each_branch_and_aggregate(full_multihead, pairs_file):
    folder, _ = full_multihead
    record = json.loads((folder / "training.json").read_text())
    assert record["command"] == "rmserve train-branches"
    assert record["results"]["shares"] == [15, 15, 15]
    held = record["results"]["held_out"]
    assert held["pairs"] == 10 and len(held["heads"]) == 3
    assert {"mean", "min", "uwo", "nominal", "tradeoff"} <= set(held["aggregates"])
    assert (
        record["options"]["branches"]["branches"] == 3 and record["options"]["train"]["trainable"] == "top:1"
    )


def test_shares_differ_per_branch_and_cost_is_the_formula():
    shares = branch_shares(40, 4, 0.5, seed=3)
    assert [len(s) for s in shares] == [20] * 4 and len({tuple(s) for s in shares}) == 4
    assert shares == branch_shares(40, 4, 0.5, seed=3)
    assert branch_cost(30, 2, 4) == pytest.approx((30 - 2 + 8) / 30)
    with pytest.raises(ValueError, match="empty"):
        branch_shares(3, 2, 0.1, seed=0)


def test_train_branches_refuses_what_it_cannot_do(tiny_model_dirs, pairs_file, tmp_path):
    base = [
        "train-branches",
        "--model",
        str(tiny_model_dirs["llama"]),
        "--data",
        str(pairs_file),
        "--out",
        str(tmp_path / "x"),
    ]
    for extra, message in (
        (["--train", "all"], "use --train top:N"),
        (["--train", "top:1", "--kind", "ensemble"], "--kind must be multihead or brme"),
        (["--train", "top:1", "--share", "0"], "--share must lie in (0, 1]"),
    ):
        result = CliRunner().invoke(app, [*base, *extra])
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
    # an existing, non-empty --out folder is never overwritten (stale branches would be served)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    result = CliRunner().invoke(app, [*base, "--train", "top:1"])
    assert result.exit_code == 2 and "exists and is not empty" in result.output, result.output
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("fixture", ["full_multihead", "lora_brme"])
def test_branches_with_shared_prefixes_equal_their_one_forward(fixture, request):
    folder, _ = request.getfixturevalue(fixture)
    served = load_model("b", folder, FP32_HF)
    assert served.info.shares_prefixes
    check_prefix_parity(served, served.new_encoder().encode_many(shared_prompt_inputs()))
