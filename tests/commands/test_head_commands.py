"""``rmserve train-heads``, ``rmserve ensemble`` and ``rmserve calibrate`` on tiny models and real HH pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rmserve.cli import app
from rmserve.config import LoadOptions
from rmserve.models.base import reward_values
from rmserve.models.decoder import DecoderBackbone
from rmserve.models.dense import DenseRewardModel
from rmserve.models.ensemble import EnsembleRewardModel, read_ensemble_config
from rmserve.models.heads import MultiHeadRewardModel, read_head_config
from rmserve.training.heads import BrmeWeights, apply_brme
from rmserve.training.pairs import read_preference_pairs


def test_train_heads_writes_a_model_that_serves_the_trained_heads(pairs_file, tiny_model_dirs, tmp_path):
    out = tmp_path / "brme"
    result = CliRunner().invoke(
        app,
        [
            "train-heads", "--backbone", str(tiny_model_dirs["llama"]), "--data", str(pairs_file), "--out", str(out),
            "--kind", "brme", "--heads", "3", "--eval-fraction", "0.25", "--max-length", "128", "--device", "cpu",
            "--bsr", "1e-3",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((out / "training.json").read_text())
    assert record["command"] == "rmserve train-heads" and record["options"]["bsr"] == 1e-3
    assert record["data"]["train_pairs"] == 30 and len(record["data"]["train_sha256"]) == 64
    assert record["results"]["pairs"] == 10
    for fragment in (
        "held-out (10 pairs)",
        "head 2",
        "tradeoff",
        "trained 3 brme heads on 30 pairs",
        f"wrote {out}",
    ):
        assert fragment in result.output
    config = read_head_config(out)
    assert (config.kind, len(config.heads), config.training["train_pairs"]) == ("brme", 3, 30)
    assert set(config.training["held_out"]["aggregates"]) == {
        "mean",
        "min",
        "max",
        "uwo",
        "nominal",
        "tradeoff",
    }
    # the served model computes exactly the trained heads on the backbone's pooled features
    model = MultiHeadRewardModel("m", out, LoadOptions(dtype="float32", device="cpu"))
    inputs = [p.chosen for p in read_preference_pairs(pairs_file)[:4]]
    encoded = model.new_encoder(128).encode_many(inputs)
    served = model.score(encoded, uwo_lambda=torch.ones(4), tradeoff_lambda=torch.full((4,), 0.6))
    features = DecoderBackbone(tiny_model_dirs["llama"], dtype="float32", device="cpu").pooled_states(encoded)
    w = model.weights
    mu, sigma = apply_brme(
        BrmeWeights(w["weight"], w["bias"], w["std_weight"], w["std_bias"], config.eps), features
    )
    torch.testing.assert_close(served.heads, mu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(served.head_std, sigma, atol=1e-5, rtol=1e-5)


def test_train_heads_refuses_bad_arguments(pairs_file, tiny_model_dirs, tmp_path):
    base = ["train-heads", "--data", str(pairs_file), "--out", str(tmp_path / "x")]
    encoder = CliRunner().invoke(app, [*base, "--backbone", str(tiny_model_dirs["bert"])])
    assert encoder.exit_code == 2 and "encoder" in encoder.output
    kind = CliRunner().invoke(app, [*base, "--backbone", str(tiny_model_dirs["llama"]), "--kind", "moe"])
    assert kind.exit_code == 2 and "--kind must be multihead or brme" in kind.output
    bsr = CliRunner().invoke(
        app, [*base, "--backbone", str(tiny_model_dirs["llama"]), "--kind", "multihead", "--bsr", "0.01"]
    )
    assert bsr.exit_code == 2 and "--bsr applies to brme heads" in bsr.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chosen": "a"}\n')
    data = CliRunner().invoke(
        app,
        [
            "train-heads",
            "--data",
            str(bad),
            "--out",
            str(tmp_path / "y"),
            "--backbone",
            str(tiny_model_dirs["llama"]),
        ],
    )
    assert data.exit_code == 2 and ":1:" in data.output


def test_ensemble_and_calibrate_store_each_members_statistics(pairs_file, tiny_model_dirs, tmp_path):
    out = tmp_path / "ens"
    members = [f"--member={name}={tiny_model_dirs[name]}" for name in ("llama", "gpt_neox", "bert")]
    created = CliRunner().invoke(app, ["ensemble", "--out", str(out), *members, "--nominal", "1"])
    assert created.exit_code == 0, created.output
    assert f"next: rmserve calibrate {out} --data" in created.output
    with pytest.raises(ValueError, match="no calibration"):
        EnsembleRewardModel("e", out, LoadOptions(device="cpu"))
    calibrated = CliRunner().invoke(
        app, ["calibrate", str(out), "--data", str(pairs_file), "--limit", "30", "--device", "cpu"]
    )
    assert calibrated.exit_code == 0, calibrated.output
    assert "calibrated 3 members on 30 inputs" in calibrated.output
    config = read_ensemble_config(out)
    assert config.nominal_member == 1
    # offline: each member scores the same 30 inputs (both responses of the first 15 pairs) one by one
    inputs = [x for p in read_preference_pairs(pairs_file)[:15] for x in (p.chosen, p.rejected)]
    for member in config.members:
        model = DenseRewardModel(member.name, Path(member.path), LoadOptions(dtype="float32", device="cpu"))
        encoder = model.new_encoder()
        rewards = torch.tensor(
            [reward_values(model, [encoder.encode(x)])[0] for x in inputs], dtype=torch.float64
        )
        assert member.calibration is not None
        assert member.calibration.inputs == 30 and member.calibration.data == "pairs.jsonl"
        assert member.calibration.mean == pytest.approx(float(rewards.mean()), abs=1e-4)
        assert member.calibration.std == pytest.approx(float(rewards.std(correction=0)), abs=1e-4)
    served = EnsembleRewardModel("e", out, LoadOptions(dtype="float32", device="cpu"))
    assert served.info.heads == ("llama", "gpt_neox", "bert")


def test_ensemble_refuses_bad_members(tiny_model_dirs, tmp_path):
    missing = CliRunner().invoke(
        app, ["ensemble", "--out", str(tmp_path / "e"), "--member", f"a={tmp_path / 'none'}"]
    )
    assert missing.exit_code == 2 and "no config.json" in missing.output
    malformed = CliRunner().invoke(app, ["ensemble", "--out", str(tmp_path / "e"), "--member", "just-a-path"])
    assert malformed.exit_code == 2 and "NAME=FOLDER" in malformed.output
