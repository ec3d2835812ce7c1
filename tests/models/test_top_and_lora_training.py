"""``rmserve train --train top:N`` and ``--lora-rank``: what trains, what is written, and parity when served.

Parity is checked against the libraries themselves: a top-N folder against vanilla transformers, a LoRA
folder against peft's own unmerged forward of base + adapter, in float32 on a mixed-length batch.
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

from rmserve.cli import app
from rmserve.config import LoadOptions
from rmserve.models.dense import DenseRewardModel
from rmserve.models.inputs import PromptResponse, Text
from rmserve.models.loader import load_model
from rmserve.models.lora import LoraRewardModel, quiet_peft
from rmserve.training.trainer import TrainOptions, bsr_penalty, pair_loss, top_layers

INPUTS = [
    PromptResponse(prompt="How do I bake bread?", response="Mix flour, water, yeast and salt, then bake."),
    Text(text="Human: hi there\n\nAssistant: Hello! How can I help you today?"),
    PromptResponse(prompt="What is 2+2?", response="4"),
    Text(text="a much longer text " * 12),
]
FP32_HF = LoadOptions(dtype="float32", device="cpu", pooling="hf")  # what transformers itself computes


def run_train(base: Path, pairs: Path, out: Path, *extra: str) -> str:
    result = CliRunner().invoke(
        app,
        ["train", "--model", str(base), "--data", str(pairs), "--out", str(out), "--epochs", "2",
         "--lr", "5e-3", "--batch-size", "4", "--max-length", "128", "--eval-fraction", "0.25", *extra],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return result.output


def transformers_scores(model: torch.nn.Module, encoded) -> list[float]:
    """The classifier's own forward on each unpadded sequence (its own pooling)."""
    with torch.no_grad():
        return [float(model(input_ids=torch.tensor([e.token_ids])).logits[0, 0]) for e in encoded]


def served_scores(served, encoded) -> list[float]:
    out = served.score(encoded, uwo_lambda=torch.ones(len(encoded)), tradeoff_lambda=torch.ones(len(encoded)))
    return out.heads[:, 0].tolist()


@pytest.fixture(scope="module")
def top1(tiny_model_dirs, pairs_file, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("top1") / "rm"
    return out, run_train(tiny_model_dirs["llama"], pairs_file, out, "--train", "top:1")


@pytest.fixture(scope="module")
def lora(tiny_model_dirs, pairs_file, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("lora") / "rm"
    extra = ("--train", "top:1", "--lora-rank", "4", "--lora-targets", "q_proj,v_proj,up_proj")
    return out, run_train(tiny_model_dirs["llama"], pairs_file, out, *extra)


def test_top_n_changes_only_the_top_layers_final_norm_and_head(top1, tiny_model_dirs):
    out, output = top1
    assert (
        "trained (top:1); layers below 1 frozen and cached" in output
        and "epoch 2: held-out accuracy" in output
    )
    before = load_file(tiny_model_dirs["llama"] / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert set(before) == set(after)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    allowed = {n for n in before if n.startswith(("model.layers.1.", "model.norm.", "score."))}
    assert changed <= allowed
    assert "score.weight" in changed and "model.norm.weight" in changed
    assert any(n.startswith("model.layers.1.") for n in changed)
    assert json.loads((out / "rmserve.json").read_text()) == {"kind": "dense", "pooling": "last"}


def test_a_served_top_n_model_equals_vanilla_transformers_on_its_folder(top1):
    out, _ = top1
    served = load_model("top1", out, FP32_HF)
    assert served.info.kind == "dense"
    encoded = served.new_encoder().encode_many(INPUTS)
    offline = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert served_scores(served, encoded) == pytest.approx(transformers_scores(offline, encoded), abs=1e-4)


def test_every_training_run_writes_its_record(top1, pairs_file):
    out, _ = top1
    record = json.loads((out / "training.json").read_text())
    assert record["command"] == "rmserve train"
    assert record["data"]["source"] == str(pairs_file)
    assert (record["data"]["train_pairs"], record["data"]["held_out_pairs"]) == (30, 10)
    assert (
        len(record["data"]["train_sha256"]) == 64
        and record["data"]["train_sha256"] != record["data"]["held_out_sha256"]
    )
    assert record["options"]["trainable"] == "top:1" and record["options"]["seed"] == 0
    assert [h["epoch"] for h in record["results"]["history"]] == [0, 1, 2]
    assert record["results"]["held_out_standard_error"] > 0
    assert {"torch", "transformers", "peft", "python"} <= set(record["versions"])
    assert (out / "checkpoint-epoch-1" / "model.safetensors").is_file()


def test_lora_writes_a_peft_adapter_that_peft_loads_and_the_server_serves_equal_to_peft(
    lora, tiny_model_dirs
):
    out, output = lora
    assert "LoRA rank 4" in output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["layers_to_transform"] == [1]
    assert set(config["target_modules"]) == {"q_proj", "v_proj", "up_proj"}
    assert "score" in config["modules_to_save"] and config["task_type"] == "SEQ_CLS"
    tensors = load_file(out / "adapter_model.safetensors")
    assert all(".layers.1." in n or n.endswith("score.weight") for n in tensors)  # only layer 1 and the head
    assert any("lora_B" in n and tensors[n].abs().max() > 0 for n in tensors)  # B starts at 0: it trained
    descriptor = json.loads((out / "rmserve.json").read_text())
    assert descriptor == {"kind": "lora", "base": str(tiny_model_dirs["llama"].resolve()), "pooling": "last"}
    # peft's own forward of base + adapter, unmerged
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dirs["llama"], dtype=torch.float32)
    with quiet_peft():
        peft_model = PeftModel.from_pretrained(base, out).eval()
    served = load_model("lora", out, FP32_HF)
    assert isinstance(served, LoraRewardModel) and served.info.kind == "lora"
    encoded = served.new_encoder().encode_many(INPUTS)
    assert served_scores(served, encoded) == pytest.approx(transformers_scores(peft_model, encoded), abs=1e-4)
    # the adapter matters: the base alone scores differently
    plain = DenseRewardModel("base", tiny_model_dirs["llama"], FP32_HF)
    assert (
        max(
            abs(a - b)
            for a, b in zip(served_scores(plain, encoded), served_scores(served, encoded), strict=True)
        )
        > 1e-3
    )


def test_merge_lora_writes_a_plain_checkpoint_that_scores_as_the_adapter(lora, tmp_path):
    out, _ = lora
    result = CliRunner().invoke(app, ["merge-lora", "--adapter", str(out), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "merged", dtype=torch.float32
    ).eval()
    served = load_model("lora", out, FP32_HF)
    encoded = served.new_encoder().encode_many(INPUTS)
    assert transformers_scores(merged, encoded) == pytest.approx(served_scores(served, encoded), abs=1e-4)
    assert json.loads((tmp_path / "merged" / "rmserve.json").read_text()) == {
        "kind": "dense",
        "pooling": "last",
    }


def test_bad_training_arguments_are_refused_with_the_fix(tiny_model_dirs, pairs_file, tmp_path):
    runner = CliRunner()
    base = [
        "train",
        "--model",
        str(tiny_model_dirs["llama"]),
        "--data",
        str(pairs_file),
        "--out",
        str(tmp_path / "x"),
    ]
    for extra, message in (
        (["--train", "top:0"], "--train must be all, top:N"),
        (["--train", "top"], "--train must be all, top:N"),
        (["--train", "top:3"], "--train top:3 asks for more layers than the model's 2"),
        (["--train", "head", "--lora-rank", "2"], "use --train top:N or all"),
        (
            ["--train", "top:1", "--lora-rank", "2", "--lora-targets", "nope"],
            "matches no module of layers [1]",
        ),
        (
            ["--train", "top:1", "--bsr-form", "cube"],
            "bsr form must be one of square-of-mean, mean-of-squares",
        ),
    ):
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output, (extra, result.output)
    missing = runner.invoke(
        app, ["merge-lora", "--adapter", str(tiny_model_dirs["llama"]), "--out", str(tmp_path / "m")]
    )
    assert missing.exit_code == 2 and "no rmserve.json" in missing.output


def test_bsr_forms_and_scaling_on_a_hand_example():
    r = torch.tensor([2.0, 1.0, 0.0, 3.0])  # chosen 2, 1; rejected 0, 3: mean 1.5, mean of squares 3.5
    bt = (-torch.nn.functional.logsigmoid(torch.tensor([2.0, -2.0]))).mean()
    assert float(bsr_penalty(r)) == pytest.approx(2.25)
    assert float(bsr_penalty(r, "mean-of-squares")) == pytest.approx(3.5)
    torch.testing.assert_close(pair_loss(r, 0.1, "mean-of-squares"), bt + 0.35)
    # eq. 28: the mean-of-squares gradient per reward is r / B (B = 2 pairs)
    leaf = r.clone().requires_grad_(True)
    bsr_penalty(leaf, "mean-of-squares").backward()
    torch.testing.assert_close(leaf.grad, r / 2)
    assert TrainOptions(bsr=1e-3, batch_size=16).bsr_strength == pytest.approx(1e-3)
    assert TrainOptions(bsr=1e-3, batch_size=16, bsr_scaling="batch").bsr_strength == pytest.approx(1.6e-2)
    assert [top_layers(t) for t in ("all", "head", "top:2")] == [None, None, 2]
