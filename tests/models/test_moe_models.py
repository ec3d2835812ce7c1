"""UMM-RM: upcycling keeps scores, served MoE equals an offline forward, merging gives a vanilla dense model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rmserve.cli import app
from rmserve.config import LoadOptions
from rmserve.models.base import module_bytes, reward_values
from rmserve.models.dense import DenseRewardModel
from rmserve.models.inputs import PromptResponse, Text
from rmserve.models.loader import load_model
from rmserve.models.moe import (
    MoERewardModel,
    UpcycledMoE,
    decoder_layers,
    load_moe_classifier,
    moe_layers,
    read_moe_config,
)
from rmserve.models.pooling import write_dense_descriptor
from rmserve.training.pairs import read_preference_pairs
from rmserve.training.trainer import balance_loss, cache_prefix, encode_pairs, encoder_for, pair_loss, rewards
from rmserve.training.upcycle import save_moe, upcycle
from rmserve_kernels.routing import route_reference
from tests.prefix_batches import check_prefix_parity, shared_prompt_inputs

INPUTS = [
    PromptResponse(prompt="How do I bake bread?", response="Mix flour, water, yeast and salt, then bake."),
    Text(text="Human: hi there\n\nAssistant: Hello! How can I help you today?"),
    PromptResponse(prompt="What is 2+2?", response="4"),
    Text(text="a much longer text " * 12),
]


def perturb(folder: Path, seed: int = 0) -> None:
    """Move every expert and router away from the dense FFN, as training would."""
    model = load_moe_classifier(folder)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for moe in moe_layers(model):
            for module in [*moe.experts, moe.router]:
                for p in module.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.5 * p.std().clamp_min(0.02))
    save_moe(model, encoder_tokenizer(folder), folder, read_moe_config(folder))


def encoder_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def offline_score(model: torch.nn.Module, ids: tuple[int, ...]) -> float:
    """The classifier on one unpadded sequence, with its own pad rule (transformers' pooling)."""
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0])


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_upcycled_model_scores_exactly_as_the_dense_one(arch, tiny_model_dirs, tmp_path):
    config = upcycle(tiny_model_dirs[arch], tmp_path / "moe", experts=4, top_k=2, seed=3)
    assert config.layers == (0, 1)
    dense = DenseRewardModel("d", tiny_model_dirs[arch], LoadOptions(dtype="float32", device="cpu"))
    moe = load_model("m", tmp_path / "moe", LoadOptions(dtype="float32", device="cpu"))
    assert isinstance(moe, MoERewardModel) and moe.info.kind == "moe"
    assert "MoE (4 experts, top-2) in 2 layers (0..1)" in moe.info.architecture
    encoded = dense.new_encoder().encode_many(INPUTS)
    torch.testing.assert_close(
        torch.tensor(reward_values(moe, encoded)),
        torch.tensor(reward_values(dense, encoded)),
        atol=1e-5,
        rtol=1e-5,
    )


def test_routing_rule_is_xft_by_default_renorm_on_request_and_legacy_folders_keep_theirs(
    tiny_model_dirs, tmp_path
):
    assert upcycle(tiny_model_dirs["llama"], tmp_path / "xft", experts=5, top_k=3, seed=1).routing == "xft"
    perturb(tmp_path / "xft")
    renorm = tmp_path / "renorm"
    shutil.copytree(tmp_path / "xft", renorm)
    descriptor = json.loads((renorm / "rmserve.json").read_text())
    descriptor["routing"] = "renormalised-top-k"  # what folders written before the choice existed say
    (renorm / "rmserve.json").write_text(json.dumps(descriptor))
    assert read_moe_config(renorm).routing == "renorm"
    assert {m.rule for m in moe_layers(load_moe_classifier(renorm))} == {"renorm"}
    options = LoadOptions(dtype="float32", device="cpu")
    xft_model, renorm_model = (MoERewardModel(n, tmp_path / n, options) for n in ("xft", "renorm"))
    encoded = xft_model.new_encoder().encode_many(INPUTS)
    # same weights, K - 1 = 2 routed experts: the two rules weigh them differently
    assert reward_values(xft_model, encoded) != pytest.approx(reward_values(renorm_model, encoded), abs=1e-6)
    descriptor["routing"] = "softmax"
    (renorm / "rmserve.json").write_text(json.dumps(descriptor))
    with pytest.raises(ValueError, match="routing 'softmax' is unknown; use one of xft, renorm"):
        read_moe_config(renorm)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_served_moe_equals_an_offline_forward_of_the_same_module(arch, tiny_model_dirs, tmp_path):
    upcycle(tiny_model_dirs[arch], tmp_path / "moe", experts=5, top_k=3, last=1, seed=1)
    perturb(tmp_path / "moe")
    served = MoERewardModel("m", tmp_path / "moe", LoadOptions(dtype="float32", device="cpu"))
    encoded = served.new_encoder().encode_many(INPUTS)
    batch = reward_values(served, encoded)  # one mixed-length batch
    offline = load_moe_classifier(tmp_path / "moe")
    dense = DenseRewardModel("d", tiny_model_dirs[arch], LoadOptions(dtype="float32", device="cpu"))
    for row, item in enumerate(encoded):
        assert batch[row] == pytest.approx(offline_score(offline, item.token_ids), abs=1e-4)
    # the perturbation changed the scores: the MoE layers are really used
    assert max(abs(a - b) for a, b in zip(batch, reward_values(dense, encoded), strict=True)) > 1e-3


def test_the_layer_records_its_routing_for_the_balance_loss_and_weights_sum_to_one(tiny_model_dirs, tmp_path):
    upcycle(tiny_model_dirs["llama"], tmp_path / "moe", experts=4, top_k=2, last=1)
    moe = moe_layers(load_moe_classifier(tmp_path / "moe"))[0]
    assert isinstance(moe, UpcycledMoE) and len(moe.experts) == 3 and moe.top_k == 2
    moe.train()
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
    moe(x)
    routing = route_reference(x.reshape(-1, 32), moe.router.weight, 1)
    assert moe.last_expert_index is not None and torch.equal(moe.last_expert_index, routing.expert_index)
    assert moe.last_router_probs is not None and moe.last_router_probs.shape == (14, 3)
    totals = routing.shared_weight + routing.expert_weight.sum(dim=-1)  # (T,)
    torch.testing.assert_close(totals, torch.ones(14))


def test_upcycle_refuses_bad_options(tiny_model_dirs, tmp_path):
    with pytest.raises(ValueError, match=r"top_k must lie in \[2, experts=3\]"):
        upcycle(tiny_model_dirs["llama"], tmp_path / "a", experts=3, top_k=4)
    with pytest.raises(ValueError, match="layer 5 does not exist"):
        upcycle(tiny_model_dirs["llama"], tmp_path / "b", experts=3, top_k=2, layers=[5])
    with pytest.raises(ValueError, match="no decoder layers"):
        upcycle(tiny_model_dirs["bert"], tmp_path / "c", experts=3, top_k=2)


def test_cached_prefix_rewards_equal_the_full_forward(tiny_model_dirs, tmp_path, pairs_file):
    upcycle(tiny_model_dirs["llama"], tmp_path / "moe", experts=3, top_k=2, last=1)
    perturb(tmp_path / "moe")
    model = load_moe_classifier(tmp_path / "moe")
    encoder = encoder_for(tmp_path / "moe", model, 128)
    data = encode_pairs(encoder, read_preference_pairs(pairs_file)[:6])
    full = rewards(model, data, range(6), 0, 2)
    cache_prefix(model, data, 1, progress=False)
    cached = rewards(model, data, range(6), 1, 2)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_moe_pooling_follows_the_dense_model_it_was_upcycled_from(tiny_model_dirs, tmp_path):
    dense = tmp_path / "dense"
    shutil.copytree(tiny_model_dirs["llama"], dense)
    write_dense_descriptor(dense, "last")  # a dense folder trained on the final token
    config = upcycle(dense, tmp_path / "moe", experts=4, top_k=2, seed=3)
    assert config.pooling == "last"
    moe = load_model("m", tmp_path / "moe", LoadOptions(dtype="float32", device="cpu"))
    assert moe.info.pooling == "last"
    classifier = load_moe_classifier(tmp_path / "moe")
    classifier.config.pad_token_id = None  # transformers reads the final token of a batch of one
    encoded = moe.new_encoder().encode_many(INPUTS)
    assert reward_values(moe, encoded) == pytest.approx(
        [offline_score(classifier, e.token_ids) for e in encoded], abs=1e-4
    )


VANILLA = """
import json, sys, torch
from transformers import AutoModelForSequenceClassification
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
assert not any(name.startswith("rmserve") for name in sys.modules)
out = []
for ids in json.loads(sys.argv[2]):
    with torch.no_grad():
        out.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
print(json.dumps(out))
"""


def test_merge_gives_a_dense_model_that_vanilla_transformers_loads(tiny_model_dirs, tmp_path):
    upcycle(tiny_model_dirs["llama"], tmp_path / "moe", experts=4, top_k=2, last=1)
    perturb(tmp_path / "moe")
    result = CliRunner().invoke(
        app,
        ["merge", "--moe", str(tmp_path / "moe"), "--out", str(tmp_path / "merged"), "--shared-rate", "0.4"],
    )
    assert result.exit_code == 0, result.output
    moe = load_moe_classifier(tmp_path / "moe")
    merged = DenseRewardModel("merged", tmp_path / "merged", LoadOptions(dtype="float32", device="cpu"))
    # uniform alpha: W = 0.4 W_shared + 0.2 (W_1 + W_2 + W_3), for gate, up and down alike
    source = moe_layers(moe)[0]
    layer = decoder_layers(merged.model)[1].mlp
    for name in ("gate_proj", "up_proj", "down_proj"):
        expected = 0.4 * getattr(source.shared, name).weight + 0.2 * sum(
            getattr(e, name).weight for e in source.experts
        )
        torch.testing.assert_close(getattr(layer, name).weight, expected, atol=1e-6, rtol=1e-6)
    encoded = merged.new_encoder().encode_many(INPUTS)
    served = reward_values(merged, encoded)
    run = subprocess.run(
        [sys.executable, "-c", VANILLA, str(tmp_path / "merged"), json.dumps([list(e.token_ids) for e in encoded])],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    )  # fmt: skip
    assert json.loads(run.stdout.splitlines()[-1]) == pytest.approx(served, abs=1e-4)


def test_merge_right_after_upcycling_is_the_dense_model(tiny_model_dirs, tmp_path):
    upcycle(tiny_model_dirs["gpt_neox"], tmp_path / "moe", experts=3, top_k=2)
    result = CliRunner().invoke(
        app, ["merge", "--moe", str(tmp_path / "moe"), "--out", str(tmp_path / "merged")]
    )
    assert result.exit_code == 0, result.output
    dense = DenseRewardModel("d", tiny_model_dirs["gpt_neox"], LoadOptions(dtype="float32", device="cpu"))
    merged = DenseRewardModel("m", tmp_path / "merged", LoadOptions(dtype="float32", device="cpu"))
    encoded = dense.new_encoder().encode_many(INPUTS)
    assert reward_values(merged, encoded) == pytest.approx(reward_values(dense, encoded), abs=1e-5)


def test_train_experts_then_learned_merge(tiny_model_dirs, tmp_path, pairs_file):
    runner = CliRunner()
    up = runner.invoke(
        app,
        [
            "upcycle",
            "--from",
            str(tiny_model_dirs["llama"]),
            "--out",
            str(tmp_path / "moe"),
            "--experts",
            "3",
            "--last",
            "1",
        ],
    )
    assert up.exit_code == 0, up.output
    assert "upcycled layers [1] into 3 experts (top-2, xft routing)" in up.output
    trained = runner.invoke(
        app,
        ["train", "--model", str(tmp_path / "moe"), "--data", str(pairs_file), "--out", str(tmp_path / "trained"),
         "--epochs", "2", "--lr", "1e-3", "--batch-size", "4", "--max-length", "128", "--eval-fraction", "0.25"],
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    for fragment in (
        "epoch 0: held-out accuracy",
        "epoch 2: held-out accuracy",
        "trained (experts)",
        "layers below 1 frozen",
    ):
        assert fragment in trained.output
    assert (tmp_path / "trained" / "checkpoint-epoch-1" / "rmserve.json").is_file()
    config = read_moe_config(tmp_path / "trained")
    assert len(config.training["results"]["history"]) == 3
    assert config.pooling == "last"  # the trainer reads each sequence's final token, and says so
    # training moved the experts apart, and the frozen layer 0 did not move
    before, after = load_moe_classifier(tmp_path / "moe"), load_moe_classifier(tmp_path / "trained")
    moe = moe_layers(after)[0]
    assert not torch.equal(moe.experts[0].up_proj.weight, moe.experts[1].up_proj.weight)
    assert not torch.equal(moe.router.weight, moe_layers(before)[0].router.weight)  # routing is learned too
    torch.testing.assert_close(
        decoder_layers(after)[0].mlp.up_proj.weight, decoder_layers(before)[0].mlp.up_proj.weight
    )
    merged = runner.invoke(
        app,
        ["merge", "--moe", str(tmp_path / "trained"), "--out", str(tmp_path / "merged"), "--data", str(pairs_file),
         "--shared-rate", "0.3", "--max-length", "128", "--eval-fraction", "0.25"],
    )  # fmt: skip
    assert merged.exit_code == 0, merged.output
    assert "merge epoch 1: held-out accuracy" in merged.output
    merged_model = DenseRewardModel("m", tmp_path / "merged", LoadOptions(device="cpu"))
    record = json.loads((tmp_path / "merged" / "training.json").read_text())
    assert record["command"] == "rmserve merge" and record["options"]["shared_rate"] == 0.3
    assert record["data"]["source"] == str(pairs_file) and record["results"]["learned"] is True
    assert (merged_model.info.kind, merged_model.info.pooling) == ("dense", "last")


def test_train_and_merge_refuse_bad_arguments(tiny_model_dirs, tmp_path, pairs_file):
    runner = CliRunner()
    args = [
        "train",
        "--model",
        str(tiny_model_dirs["llama"]),
        "--data",
        str(pairs_file),
        "--out",
        str(tmp_path / "x"),
    ]
    dense_experts = runner.invoke(app, args)
    assert dense_experts.exit_code == 2 and "needs a moe model" in dense_experts.output
    upcycle(tiny_model_dirs["llama"], tmp_path / "moe", experts=3, top_k=2, last=1)
    rate = runner.invoke(
        app, ["merge", "--moe", str(tmp_path / "moe"), "--out", str(tmp_path / "y"), "--shared-rate", "1"]
    )
    assert rate.exit_code == 2 and "[0, 1)" in rate.output
    not_moe = runner.invoke(
        app, ["merge", "--moe", str(tiny_model_dirs["llama"]), "--out", str(tmp_path / "z")]
    )
    assert not_moe.exit_code == 2 and "rmserve upcycle" in not_moe.output


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="the MoE kernels run in Triton's interpreter (make test sets it)",
)
def test_served_moe_with_triton_kernels_equals_the_reference_path(tiny_model_dirs, tmp_path):
    pytest.importorskip("triton")
    upcycle(tiny_model_dirs["llama"], tmp_path / "moe", experts=4, top_k=3, seed=2)
    perturb(tmp_path / "moe")
    reference = MoERewardModel(
        "r", tmp_path / "moe", LoadOptions(dtype="float32", device="cpu", kernels="reference")
    )
    fused = MoERewardModel(
        "t", tmp_path / "moe", LoadOptions(dtype="float32", device="cpu", kernels="triton")
    )
    encoded = reference.new_encoder().encode_many(INPUTS)
    assert reward_values(fused, encoded) == pytest.approx(reward_values(reference, encoded), abs=1e-4)
    # the kernels read the experts in place: every expert weight is a view of its projection's stack
    assert fused.info.weights_bytes == module_bytes(fused.model) == reference.info.weights_bytes
    for layer in moe_layers(fused.model):
        for name, stacked in zip(("gate_proj", "up_proj", "down_proj"), layer._stacked, strict=True):
            for index, expert in enumerate(layer.experts):
                weight = getattr(expert, name).weight
                assert weight.data_ptr() == stacked[index].data_ptr() and torch.equal(weight, stacked[index])
    fused.model.to(torch.float64).to(torch.float32)  # a cast (or move) breaks the views: the next forward
    layer = moe_layers(fused.model)[0]  # stacks again
    assert layer._stacked[0][0].data_ptr() != layer.experts[0].gate_proj.weight.data_ptr()
    assert reward_values(fused, encoded) == pytest.approx(reward_values(reference, encoded), abs=1e-4)
    assert layer._stacked[0][0].data_ptr() == layer.experts[0].gate_proj.weight.data_ptr()
    with pytest.raises(ValueError, match="SwiGLU"):
        upcycle(tiny_model_dirs["gpt_neox"], tmp_path / "neox", experts=3, top_k=2)
        MoERewardModel("n", tmp_path / "neox", LoadOptions(dtype="float32", device="cpu", kernels="triton"))


def test_pair_loss_and_balance_loss_on_hand_examples(tiny_model_dirs, tmp_path):
    r = torch.tensor([2.0, 1.0, 0.0, 3.0])  # chosen 2, 1; rejected 0, 3
    expected = (-torch.nn.functional.logsigmoid(torch.tensor([2.0, -2.0]))).mean() + 1e-3 * 1.5**2
    torch.testing.assert_close(pair_loss(r, 1e-3), expected)
    upcycle(tiny_model_dirs["llama"], tmp_path / "moe", experts=3, top_k=2, last=1)
    model = load_moe_classifier(tmp_path / "moe")
    moe = moe_layers(model)[0]
    moe.last_router_probs = torch.full((4, 2), 0.5)  # uniform router, tokens split evenly: the minimum, 1
    moe.last_expert_index = torch.tensor([[0], [1], [0], [1]])
    torch.testing.assert_close(balance_loss(model), torch.tensor(1.0))
    moe.last_expert_index = torch.tensor([[0], [0], [0], [0]])  # every token on expert 0
    moe.last_router_probs = torch.tensor([[1.0, 0.0]] * 4)  # and a router sure of it: 2 * (1 * 1) = 2
    torch.testing.assert_close(balance_loss(model), torch.tensor(2.0))


def test_moe_rewards_with_shared_prefixes_equal_its_one_forward(tiny_model_dirs, tmp_path):
    upcycle(tiny_model_dirs["llama"], tmp_path / "moe", experts=5, top_k=3, last=1, seed=1)
    perturb(tmp_path / "moe")
    served = MoERewardModel("m", tmp_path / "moe", LoadOptions(dtype="float32", device="cpu"))
    assert served.info.shares_prefixes
    check_prefix_parity(served, served.new_encoder().encode_many(shared_prompt_inputs()))
