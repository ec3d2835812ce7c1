"""Multi-head, BRME and ensemble backends equal a plain offline computation (fp32, batches vs alone)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification

from rmserve.config import LoadOptions
from rmserve.models.base import lambdas_for
from rmserve.models.ensemble import (
    Calibration,
    EnsembleConfig,
    EnsembleRewardModel,
    Member,
    write_ensemble_config,
)
from rmserve.models.heads import MultiHeadRewardModel, save_head_model
from rmserve.models.inputs import Messages, PromptResponse, Text
from rmserve.models.loader import folder_kind, load_model
from rmserve.names import AGGREGATES
from tests.tiny_models import random_heads

TOL = 1e-4
INPUTS = [
    PromptResponse(prompt="How do I bake bread?", response="Mix flour, water, yeast and salt, then bake."),
    Text(text="Human: hi there\n\nAssistant: Hello! How can I help you today?"),
    Messages(
        messages=[{"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "No."}]
    ),
    PromptResponse(prompt="What is 2+2?", response="4"),
    Text(text="a much longer text " * 12),
]
K = 5


@pytest.fixture(scope="module")
def head_dirs(tiny_head_model_dirs) -> dict[str, Path]:
    return tiny_head_model_dirs


def offline_pooled(backbone: Path, ids: tuple[int, ...]) -> torch.Tensor:
    """The final hidden state of the token transformers' classifiers score (the last one that is not the
    config's pad token), the sequence run alone by plain transformers: (H,)."""
    base = AutoModel.from_pretrained(backbone, dtype=torch.float32).eval()
    pad = base.config.pad_token_id
    position = max((i for i, t in enumerate(ids) if t != pad), default=0)
    assert position < len(ids) - 1 or pad is None or ids[-1] != pad
    with torch.no_grad():
        return base(input_ids=torch.tensor([ids])).last_hidden_state[0, position]


def offline_aggregates(heads: list[float], nominal: int, uwo: float, trade: float) -> dict[str, float]:
    """Every aggregate by its definition, in float64."""
    k = len(heads)
    mean = sum(heads) / k
    var = sum((h - mean) ** 2 for h in heads) / k
    return {
        "mean": mean, "min": min(heads), "max": max(heads), "std": math.sqrt(var), "uwo": mean - uwo * var,
        "nominal": heads[nominal], "tradeoff": trade * heads[nominal] + (1 - trade) * min(heads),
    }  # fmt: skip


def assert_aggregates(row: torch.Tensor, expected: dict[str, float]) -> None:
    for name, value in zip(AGGREGATES, row.tolist(), strict=True):
        assert value == pytest.approx(expected[name], abs=TOL, rel=TOL), name


@pytest.mark.parametrize("kind", ["multihead", "brme"])
def test_head_models_equal_the_offline_computation(kind, head_dirs, tiny_model_dirs):
    model = MultiHeadRewardModel("m", head_dirs[kind], LoadOptions(dtype="float32", device="cpu"))
    encoded = model.new_encoder().encode_many(INPUTS)
    uwo = torch.tensor([0.0, 0.5, 1.0, 2.0, 0.25])
    trade = torch.tensor([0.0, 0.6, 1.0, 0.3, 0.9])
    out = model.score(encoded, uwo_lambda=uwo, tradeoff_lambda=trade)  # one mixed-length batch
    weights = random_heads(32, K, brme=kind == "brme", seed=0 if kind == "multihead" else 1)
    for row, item in enumerate(encoded):
        h = offline_pooled(tiny_model_dirs["llama"], item.token_ids).double()  # (H,)
        mu = (weights["weight"].double() @ h + weights["bias"].double()).tolist()
        torch.testing.assert_close(
            out.heads[row].double(), torch.tensor(mu, dtype=torch.float64), atol=TOL, rtol=TOL
        )
        if kind == "brme":
            logits = weights["std_weight"].double() @ h + weights["std_bias"].double()
            sigma = (torch.nn.functional.softplus(logits) + 1e-3).tolist()
            assert out.head_std is not None
            torch.testing.assert_close(
                out.head_std[row].double(), torch.tensor(sigma).double(), atol=TOL, rtol=TOL
            )
            nominal = min(range(K), key=lambda i: sigma[i])
        else:
            assert out.head_std is None
            nominal = 2
        assert_aggregates(
            out.aggregates[row], offline_aggregates(mu, nominal, float(uwo[row]), float(trade[row]))
        )


def test_head_model_info_and_defaults(head_dirs):
    brme = load_model("b", head_dirs["brme"], LoadOptions(dtype="float32", device="cpu"))
    multi = load_model("m", head_dirs["multihead"], LoadOptions(dtype="float32", device="cpu"))
    assert (brme.info.kind, brme.info.reward, brme.info.has_std, brme.info.nominal_head) == (
        "brme",
        "tradeoff",
        True,
        None,
    )
    assert (multi.info.kind, multi.info.reward, multi.info.has_std, multi.info.nominal) == (
        "multihead",
        "mean",
        False,
        "head2",
    )
    assert brme.info.heads == tuple(f"head{i}" for i in range(K))
    assert isinstance(multi, MultiHeadRewardModel)
    assert multi.info.parameters == sum(p.numel() for p in multi.backbone.base.parameters()) + K * (32 + 1)


def test_batch_composition_does_not_change_head_outputs(head_dirs):
    model = MultiHeadRewardModel("b", head_dirs["brme"], LoadOptions(dtype="float32", device="cpu"))
    encoded = model.new_encoder().encode_many(INPUTS)
    together = model.score(encoded, **lambdas_for(model.info.defaults, len(encoded)))
    for row, item in enumerate(encoded):
        alone = model.score([item], **lambdas_for(model.info.defaults, 1))
        torch.testing.assert_close(alone.heads[0], together.heads[row], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone.aggregates[0], together.aggregates[row], atol=1e-5, rtol=1e-5)


def test_head_model_folder_errors(tiny_model_dirs, tmp_path):
    backbone = str(tiny_model_dirs["llama"])
    with pytest.raises(ValueError, match="std_bias"):
        save_head_model(
            tmp_path / "a", kind="brme", backbone=backbone, weights=random_heads(32, 2, brme=False, seed=0)
        )
    save_head_model(
        tmp_path / "b", kind="multihead", backbone=backbone, weights=random_heads(16, 2, brme=False, seed=0)
    )
    with pytest.raises(ValueError, match=r"expected \(2, 32\).*hidden size 32"):
        MultiHeadRewardModel("b", tmp_path / "b", LoadOptions(device="cpu"))
    save_head_model(
        tmp_path / "c",
        kind="multihead",
        backbone="../nowhere",
        weights=random_heads(32, 2, brme=False, seed=0),
    )
    with pytest.raises(ValueError, match="not a Hugging Face model folder"):
        MultiHeadRewardModel("c", tmp_path / "c", LoadOptions(device="cpu"))
    save_head_model(tmp_path / "d", kind="multihead", backbone=str(tiny_model_dirs["bert"]),
                    weights=random_heads(32, 2, brme=False, seed=0))  # fmt: skip
    with pytest.raises(ValueError, match="encoder"):
        MultiHeadRewardModel("d", tmp_path / "d", LoadOptions(device="cpu"))
    with pytest.raises(ValueError, match="nominal_head=3 but there are only 2 heads"):
        save_head_model(tmp_path / "e", kind="multihead", backbone=backbone,
                        weights=random_heads(32, 2, brme=False, seed=0), nominal_head=3)  # fmt: skip
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "rmserve.json").write_text('{"kind": "mixture"}')
    with pytest.raises(ValueError, match="kind 'mixture'"):
        folder_kind(tmp_path / "f")
    with pytest.raises(ValueError, match=r"configured as kind 'brme'.*holds a multihead"):
        load_model("x", tmp_path / "b", LoadOptions(kind="brme"))


# --- ensembles -------------------------------------------------------------------------------------


CALIBRATION = {"llama": (0.5, 2.0), "gpt_neox": (-1.0, 0.5), "bert": (0.25, 4.0)}


@pytest.fixture(scope="module")
def ensemble_dir(tiny_model_dirs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ensemble")
    members = [
        Member(name=name, path=str(tiny_model_dirs[name]), calibration=Calibration(mean=m, std=s))
        for name, (m, s) in CALIBRATION.items()
    ]
    return write_ensemble_config(root / "ens", EnsembleConfig(members=tuple(members), nominal_member=1))


def offline_member_reward(folder: Path, item) -> float:
    """A member's reward for one input run alone through plain transformers (the checkpoint as saved)."""
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    kwargs = {}
    if item.token_type_ids is not None:
        kwargs["token_type_ids"] = torch.tensor([item.token_type_ids])
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([item.token_ids]), **kwargs).logits[0, 0])


def test_ensemble_equals_calibrated_offline_members(ensemble_dir, tiny_model_dirs):
    model = EnsembleRewardModel("ens", ensemble_dir, LoadOptions(dtype="float32", device="cpu"))
    assert model.info.heads == ("llama", "gpt_neox", "bert")
    assert model.info.nominal == "gpt_neox"
    encoded = model.new_encoder().encode_many(INPUTS)
    assert len(encoded[0]) == max(len(p) for p in encoded[0].parts)
    # heterologous: every member tokenises with its own tokenizer
    assert len({p.token_ids for p in encoded[0].parts}) == 3
    out = model.score(encoded, uwo_lambda=torch.full((5,), 0.5), tradeoff_lambda=torch.full((5,), 0.25))
    for row, item in enumerate(encoded):
        calibrated = []
        for index, (name, (mean, std)) in enumerate(CALIBRATION.items()):
            raw = offline_member_reward(tiny_model_dirs[name], item.parts[index])
            calibrated.append((raw - mean) / std)
        torch.testing.assert_close(
            out.heads[row].double(), torch.tensor(calibrated).double(), atol=TOL, rtol=TOL
        )
        assert_aggregates(out.aggregates[row], offline_aggregates(calibrated, 1, 0.5, 0.25))


def test_ensemble_refuses_uncalibrated_members(tiny_model_dirs, tmp_path):
    members = (Member(name="a", path=str(tiny_model_dirs["llama"])), Member(name="b", path="../b"))
    folder = write_ensemble_config(tmp_path / "e", EnsembleConfig(members=members))
    with pytest.raises(ValueError, match=r"members a, b have no calibration.*rmserve calibrate"):
        EnsembleRewardModel("e", folder, LoadOptions(device="cpu"))
    with pytest.raises(ValueError, match="member 'b'"):
        EnsembleRewardModel("e", folder, LoadOptions(device="cpu"), require_calibration=False)
    with pytest.raises(ValueError, match="unique"):
        EnsembleConfig(members=(members[0], members[0]))
    with pytest.raises(ValueError, match="nominal_member=2"):
        EnsembleConfig(members=members, nominal_member=2)
    assert folder_kind(folder) == "ensemble"


def test_head_models_read_the_final_token_with_pooling_last(head_dirs, tiny_model_dirs, tmp_path):
    model = MultiHeadRewardModel(
        "m", head_dirs["multihead"], LoadOptions(dtype="float32", device="cpu", pooling="last")
    )
    assert model.info.pooling == "last"
    encoded = model.new_encoder().encode_many(INPUTS)
    states = model.backbone.pooled_states(encoded)  # (B, H), one batch
    base = AutoModel.from_pretrained(tiny_model_dirs["llama"], dtype=torch.float32).eval()
    for row, item in enumerate(encoded):
        with torch.no_grad():
            expected = base(input_ids=torch.tensor([item.token_ids])).last_hidden_state[0, -1]  # (H,)
        torch.testing.assert_close(states[row], expected, atol=TOL, rtol=TOL)
    # a folder declares the rule its heads were trained on
    declared = save_head_model(
        tmp_path / "declared",
        kind="multihead",
        backbone=str(tiny_model_dirs["llama"]),
        weights=random_heads(32, 2, brme=False, seed=0),
        pooling="last",
    )
    assert MultiHeadRewardModel("d", declared, LoadOptions(device="cpu")).info.pooling == "last"
    assert MultiHeadRewardModel("d", declared, LoadOptions(device="cpu", pooling="hf")).info.pooling == "hf"
