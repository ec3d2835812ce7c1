"""The demo head trainer: the fit on synthetic features with a known answer, and feature extraction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rmserve.config import LoadOptions
from rmserve.demo.build import DEMO_POOLING
from rmserve.models.base import reward_values
from rmserve.models.dense import DenseRewardModel
from rmserve.models.inputs import Messages
from rmserve.training.fitting import (
    L2_GRID,
    binomial_interval,
    feature_scale,
    fit_head,
    fit_scaled_head,
    fold_head,
    pairwise_accuracy,
    select_head,
)
from rmserve.training.recipes.demo_head import extract_features
from tests.tiny_models import build_llama

pytestmark = pytest.mark.unit

H = 16
KNOWN = 3  # the dimension that decides every preference


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs whose chosen side is ahead by at least 2 on dimension KNOWN; dimensions of scales 0.1..10."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.1, 10, H)  # (H,)
    chosen = torch.randn(n, H, generator=g) * scales  # (n, H)
    rejected = torch.randn(n, H, generator=g) * scales  # (n, H)
    swap = chosen[:, KNOWN] < rejected[:, KNOWN]  # (n,)
    chosen[swap], rejected[swap] = rejected[swap].clone(), chosen[swap].clone()
    chosen[:, KNOWN] += 2.0
    return chosen, rejected


@pytest.mark.parametrize("objective", ["bt", "margin"])
def test_separable_preferences_are_learned_exactly(objective):
    chosen, rejected = synthetic(400, seed=0)
    w = fit_head(chosen - rejected, l2=1e-4, objective=objective)  # (H,)
    assert w.shape == (H,) and w.dtype == torch.float32
    test_chosen, test_rejected = synthetic(400, seed=1)
    assert pairwise_accuracy(w, chosen, rejected) == 1.0
    assert pairwise_accuracy(w, test_chosen, test_rejected) == 1.0
    contribution = (w * (chosen - rejected).std(0)).abs()  # (H,): each dimension's share of the margin
    assert contribution.argmax().item() == KNOWN


def test_the_folded_head_gives_the_standardised_rewards():
    chosen, rejected = synthetic(200, seed=2)
    scale = feature_scale(chosen - rejected)  # (H,)
    v = fit_scaled_head((chosen - rejected).double() / scale, l2=1e-2)  # (H,)
    w = fold_head(v, scale)  # (H,)
    features = torch.cat([chosen, rejected]).double()  # (2n, H)
    standardised = (features / scale) @ v  # (2n,)
    folded = features @ w.double()  # (2n,)
    assert (standardised - folded).abs().max().item() < 1e-6 * standardised.abs().max().item()
    assert torch.equal(fit_head(chosen - rejected, l2=1e-2), w)


def test_scaling_makes_the_fit_independent_of_feature_units():
    chosen, rejected = synthetic(200, seed=3)
    units = torch.logspace(-3, 3, H)  # (H,): a different unit per dimension
    w = fit_head(chosen - rejected, l2=1e-2)
    w_units = fit_head((chosen - rejected) * units, l2=1e-2)
    assert torch.allclose(w_units * units, w, rtol=1e-4, atol=1e-6)


def test_a_stronger_penalty_shrinks_the_head():
    chosen, rejected = synthetic(200, seed=4)
    norms = [fit_head(chosen - rejected, l2).norm().item() for l2 in (1e-4, 1e-2, 1.0)]
    assert norms[0] > norms[1] > norms[2] > 0


def test_an_unknown_objective_is_refused():
    with pytest.raises(ValueError, match="objective must be one of"):
        fit_scaled_head(torch.ones(2, H), l2=1.0, objective="hinge")  # type: ignore[arg-type]


def test_selection_uses_only_the_train_pairs():
    chosen, rejected = synthetic(300, seed=5)
    train, held_out = list(range(0, 240)), list(range(240, 300))
    poisoned_chosen, poisoned_rejected = chosen.clone(), rejected.clone()
    poisoned_chosen[held_out], poisoned_rejected[held_out] = float("nan"), float("inf")
    clean = select_head(chosen, rejected, train)
    poisoned = select_head(poisoned_chosen, poisoned_rejected, train)
    assert torch.equal(clean.head, poisoned.head)
    assert set(clean.fit_pairs).isdisjoint(clean.validation_pairs)
    assert sorted(clean.fit_pairs + clean.validation_pairs) == train
    assert len(clean.validation_pairs) == 48
    assert len(clean.validation) == 2 * len(L2_GRID)
    # separable: every setting is perfect on validation, and ties go to the strongest penalty, then BT
    assert set(clean.validation.values()) == {1.0}
    assert (clean.objective, clean.l2) == ("bt", max(L2_GRID))
    weak = select_head(chosen, rejected, train, grid=(1e-4,), objectives=("margin",))
    assert (weak.objective, weak.l2) == ("margin", 1e-4)
    assert pairwise_accuracy(weak.head, chosen[held_out], rejected[held_out]) == 1.0


def test_binomial_interval_matches_the_textbook_values():
    interval = binomial_interval(80, 100)
    assert interval.value == 0.8
    assert interval.standard_error == pytest.approx(0.04, abs=1e-12)
    assert (interval.low, interval.high) == pytest.approx((0.7112, 0.8666), abs=1e-4)
    assert binomial_interval(0, 10).low == 0.0
    with pytest.raises(ValueError, match="at least one trial"):
        binomial_interval(0, 0)


DIALOGUES = [
    [
        {"role": "user", "content": "How do I bake bread?"},
        {"role": "assistant", "content": "Knead, rise, bake."},
    ],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    [
        {"role": "user", "content": "Tell me a very long story about a cat and a dog."},
        {"role": "assistant", "content": "Once upon a time a cat and a dog lived together happily. " * 4},
    ],
]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama(tmp_path_factory.mktemp("tiny-llama") / "llama")


def test_features_are_what_the_server_scores(tiny_llama, tmp_path):
    cache = tmp_path / "features.safetensors"
    features, stats = extract_features(
        tiny_llama, DIALOGUES, cache, cache_key={"data": "x"}, max_length=40, progress=False
    )
    # the demo heads read the final token (the demos declare pooling `last`)
    server = DenseRewardModel(
        "tiny", tiny_llama, LoadOptions(dtype="float32", device="cpu", max_length=40, pooling=DEMO_POOLING)
    )
    encoder = server.new_encoder()
    encoded = [encoder.encode(Messages.model_validate({"messages": d})) for d in DIALOGUES]
    expected = server.pooled_states(encoded)  # (3, H)
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)
    assert [e.truncated for e in encoded] == [False, False, True]
    assert (stats.dialogues, stats.truncated, stats.tokens) == (3, 1, sum(len(e) for e in encoded))
    # the reward the server returns is the trained head applied to these features
    torch.testing.assert_close(
        torch.tensor(reward_values(server, encoded)), features @ server.head.weight[0], rtol=0, atol=1e-5
    )


def test_extraction_resumes_and_refuses_a_foreign_cache(tiny_llama, tmp_path):
    cache = tmp_path / "features.safetensors"
    full, _ = extract_features(tiny_llama, DIALOGUES, cache, cache_key={"data": "x"}, progress=False)
    with safe_open(cache, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    tensors["done"][1] = 0
    tensors["features"][1] = 0.0
    save_file(tensors, str(cache), metadata=meta)  # as if interrupted before dialogue 1 was saved
    resumed, stats = extract_features(tiny_llama, DIALOGUES, cache, cache_key={"data": "x"}, progress=False)
    torch.testing.assert_close(resumed, full, rtol=0, atol=0)
    assert stats.dialogues == 4  # three the first time, one on resuming

    # a complete cache is read without loading the model: a missing model folder goes unnoticed
    again, _ = extract_features(
        tmp_path / "no-model", DIALOGUES, cache, cache_key={"data": "x"}, progress=False
    )
    torch.testing.assert_close(again, full, rtol=0, atol=0)
    with pytest.raises(ValueError, match="delete it to extract afresh"):
        extract_features(tiny_llama, DIALOGUES, cache, cache_key={"data": "y"}, progress=False)
