"""Multi-head and BRME training on synthetic features with a known direction, and the pair reader."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rmserve.aggregation import AggregationParams
from rmserve.models.inputs import Messages, PromptResponse, Text
from rmserve.names import AGGREGATES
from rmserve.training.heads import (
    BrmeWeights,
    MultiheadWeights,
    apply_brme,
    apply_multihead,
    brme_loss,
    evaluate_heads,
    format_report,
    partition_pairs,
    train_brme,
    train_multihead,
)
from rmserve.training.pairs import read_preference_pairs

pytestmark = pytest.mark.unit

H = 16
N = 400
TRUE = torch.linspace(1.0, -1.0, H)  # (H,): the direction that decides preferences


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs with ``chosen = rejected + 1.5 * direction + noise``, features of mixed units and offsets."""
    g = torch.Generator().manual_seed(seed)
    direction = TRUE / TRUE.norm()  # (H,)
    units = torch.logspace(-1, 1, H)  # (H,): 0.1 .. 10
    offset = torch.linspace(-5.0, 5.0, H)  # (H,)
    rejected = torch.randn(n, H, generator=g)  # (n, H)
    chosen = rejected + 1.5 * direction + torch.randn(n, H, generator=g)  # (n, H): Bayes accuracy 93%
    return chosen * units + offset, rejected * units + offset


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return synthetic(N, seed=0)


@pytest.fixture(scope="module")
def multihead(data) -> MultiheadWeights:
    return train_multihead(*data, heads=4, seed=0, progress=False)


@pytest.fixture(scope="module")
def brme(data) -> BrmeWeights:
    return train_brme(*data, heads=3, seed=0, epochs=10, progress=False)


def accuracies(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> list[float]:
    return (chosen_rewards > rejected_rewards).double().mean(0).tolist()  # (N, k) -> k


# ---------------------------------------------------------------------------------------- multihead


def test_partition_gives_every_head_a_balanced_random_share():
    assignment = partition_pairs(10, 3, torch.Generator().manual_seed(0))  # (10,)
    assert sorted(torch.bincount(assignment, minlength=3).tolist()) == [3, 3, 4]
    again = partition_pairs(10, 3, torch.Generator().manual_seed(0))
    other = partition_pairs(10, 3, torch.Generator().manual_seed(1))
    assert torch.equal(assignment, again) and not torch.equal(assignment, other)


def test_every_multihead_head_ranks_held_out_pairs(multihead):
    assert multihead.weight.shape == (4, H) and multihead.bias.shape == (4,)
    assert multihead.weight.dtype == multihead.bias.dtype == torch.float32
    test_chosen, test_rejected = synthetic(N, seed=1)
    for accuracy in accuracies(
        apply_multihead(multihead, test_chosen), apply_multihead(multihead, test_rejected)
    ):
        assert accuracy > 0.85


def test_multihead_heads_differ_because_their_data_differ(multihead):
    w = multihead.weight / multihead.weight.norm(dim=1, keepdim=True)  # (k, H)
    cosine = w @ w.T  # (k, k)
    off_diagonal = cosine[~torch.eye(4, dtype=torch.bool)]
    assert (off_diagonal > 0.8).all()  # the same signal ...
    assert (off_diagonal < 0.9999).all()  # ... from different pairs


def test_multihead_biases_centre_every_head_on_the_training_responses(data, multihead):
    rewards = apply_multihead(multihead, torch.cat(data)).double()  # (2N, k)
    scale = rewards.abs().mean(0)  # (k,)
    assert (rewards.mean(0).abs() < 1e-5 * scale).all()


def test_multihead_seeds_reproduce_and_differ(data, multihead):
    again = train_multihead(*data, heads=4, seed=0, progress=False)
    other = train_multihead(*data, heads=4, seed=1, progress=False)
    assert torch.equal(again.weight, multihead.weight) and torch.equal(again.bias, multihead.bias)
    assert not torch.equal(other.weight, multihead.weight)


def test_one_head_sees_every_pair(data):
    one = train_multihead(*data, heads=1, seed=0, progress=False)
    other_seed = train_multihead(*data, heads=1, seed=5, progress=False)
    assert one.weight.shape == (1, H)
    assert torch.equal(one.weight, other_seed.weight)  # the only share is all of the data


@pytest.mark.parametrize(
    ("chosen", "rejected", "kwargs", "message"),
    [
        (torch.zeros(10, H), torch.zeros(10, H), {"heads": 0}, "heads must be >= 1"),
        (torch.zeros(10, H), torch.zeros(9, H), {"heads": 2}, "must both be"),
        (torch.zeros(3, H), torch.zeros(3, H), {"heads": 4}, "use fewer heads or more pairs"),
        (torch.full((10, H), math.nan), torch.zeros(10, H), {"heads": 2}, "NaN"),
        (torch.zeros(10, H), torch.zeros(10, H), {"heads": 2, "l2": 0.0}, "l2 must be > 0"),
    ],
)
def test_multihead_refuses_bad_arguments(chosen, rejected, kwargs, message):
    with pytest.raises(ValueError, match=message):
        train_multihead(chosen, rejected, seed=0, progress=False, **kwargs)


# --------------------------------------------------------------------------------------------- BRME


def test_brme_loss_on_a_hand_computed_example():
    # pair 0: p_hat 0.75, alpha 2 -> targets +0.5 / -0.5; r+ = 1 + 1 * 0.5 = 1.5, r- = -1 + (-2) * 0.25 = -1.5
    # loss (1.5 - 0.5)^2 + (-1.5 + 0.5)^2 = 2
    # pair 1: p_hat 0.25 -> targets -0.5 / +0.5; r+ = 0 + 0 * 1 = 0, r- = 0.5 + 0.5 * 2 = 1.5
    # loss (0 + 0.5)^2 + (1.5 - 0.5)^2 = 1.25
    loss = brme_loss(
        mu_c=torch.tensor([1.0, 0.0]),
        sigma_c=torch.tensor([0.5, 1.0]),
        mu_r=torch.tensor([-1.0, 0.5]),
        sigma_r=torch.tensor([0.25, 2.0]),
        p_hat=torch.tensor([0.75, 0.25]),
        alpha=2.0,
        noise_c=torch.tensor([1.0, 0.0]),
        noise_r=torch.tensor([-2.0, 0.5]),
    )
    assert loss.tolist() == [2.0, 1.25]


def test_brme_loss_is_antisymmetric_in_chosen_and_rejected():
    args = [torch.tensor([0.3]), torch.tensor([0.2]), torch.tensor([-0.1]), torch.tensor([0.4])]
    noise = [torch.tensor([0.7]), torch.tensor([-1.1])]
    loss = brme_loss(*args, torch.tensor([0.9]), 3.0, *noise)
    swapped = brme_loss(args[2], args[3], args[0], args[1], torch.tensor([0.1]), 3.0, noise[1], noise[0])
    assert torch.allclose(loss, swapped)


def test_brme_weights_act_on_raw_features(data, brme):
    assert brme.mean_weight.shape == brme.std_weight.shape == (3, H)
    assert brme.mean_bias.shape == brme.std_bias.shape == (3,)
    features = torch.cat(data)  # (2N, H)
    mu, sigma = apply_brme(brme, features)  # (2N, k)
    explicit_mu = features.double() @ brme.mean_weight.double().T + brme.mean_bias.double()  # (2N, k)
    explicit_pre = features.double() @ brme.std_weight.double().T + brme.std_bias.double()  # (2N, k)
    explicit_sigma = F.softplus(explicit_pre) + brme.eps  # (2N, k)
    torch.testing.assert_close(mu.double(), explicit_mu, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sigma.double(), explicit_sigma, rtol=1e-5, atol=1e-5)


def test_brme_sigma_stays_above_eps(brme):
    test_chosen, test_rejected = synthetic(N, seed=1)
    for features in (test_chosen, test_rejected):
        _, sigma = apply_brme(brme, features)
        assert (sigma > brme.eps).all()
    _, far = apply_brme(brme, 100 * test_chosen)  # far outside the training data: softplus underflows
    assert torch.isfinite(far).all() and (far >= brme.eps).all()


def test_brme_mean_heads_rank_held_out_pairs(brme):
    test_chosen, test_rejected = synthetic(N, seed=1)
    mu_c, _ = apply_brme(brme, test_chosen)
    mu_r, _ = apply_brme(brme, test_rejected)
    for accuracy in accuracies(mu_c, mu_r):
        assert accuracy > 0.85


def test_brme_training_reproduces_under_a_seed(data, brme):
    again = train_brme(*data, heads=3, seed=0, epochs=10, progress=False)
    other = train_brme(*data, heads=3, seed=1, epochs=10, progress=False)
    for name in ("mean_weight", "mean_bias", "std_weight", "std_bias"):
        assert torch.equal(getattr(again, name), getattr(brme, name)), name
    assert not torch.equal(other.mean_weight, brme.mean_weight)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 0.0}, "alpha must be a finite number > 0"),
        ({"eps": -1.0}, "eps must be a finite number > 0"),
        ({"lr": math.inf}, "lr must be a finite number > 0"),
        ({"epochs": 0}, "epochs and batch_size must be >= 1"),
        ({"heads": 11}, "use fewer heads or more pairs"),
    ],
)
def test_brme_refuses_bad_arguments(kwargs, message):
    chosen, rejected = synthetic(10, seed=2)
    with pytest.raises(ValueError, match=message):
        train_brme(chosen, rejected, **{"heads": 2, "seed": 0, "progress": False, **kwargs})


def test_weights_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match=r"weight must be \(k, H\)"):
        MultiheadWeights(torch.zeros(2, H), torch.zeros(3))
    with pytest.raises(ValueError, match="eps must be > 0"):
        BrmeWeights(torch.zeros(2, H), torch.zeros(2), torch.zeros(2, H), torch.zeros(2), 0.0)
    with pytest.raises(ValueError, match=r"features must be \(N, 16\)"):
        apply_multihead(MultiheadWeights(torch.zeros(2, H), torch.zeros(2)), torch.zeros(5, 8))


# ----------------------------------------------------------------------------------------- evaluate


def test_evaluation_on_hand_made_rewards():
    chosen = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0]])  # (3, 2)
    rejected = torch.tensor([[1.0, 1.0], [0.0, 2.0], [1.0, 0.0]])  # (3, 2)
    out = evaluate_heads(chosen, rejected, None, None, nominal_head=1, params=AggregationParams())
    assert [h.value for h in out.heads] == pytest.approx([2 / 3, 1 / 3])
    assert list(out.aggregates) == [name for name in AGGREGATES if name != "std"]
    # mean: 1 vs 1 (tie, not a win), 1 vs 1 (tie), 1.5 vs 0.5 -> 1/3; min: 0 vs 1, 1 vs 0, 0 vs 0 -> 1/3
    assert out.aggregates["mean"].value == pytest.approx(1 / 3)
    assert out.aggregates["min"].value == pytest.approx(1 / 3)
    assert out.aggregates["nominal"].value == pytest.approx(1 / 3)
    assert out.heads[0].standard_error == pytest.approx(math.sqrt(2 / 9 / 3))
    report = format_report(out)
    assert "head 1" in report and "tradeoff" in report and "std" not in report.split("\n", 2)[2]


def test_evaluation_picks_each_inputs_smallest_sigma_as_nominal():
    chosen = torch.tensor([[1.0, -5.0]])  # (1, 2)
    rejected = torch.tensor([[0.0, 9.0]])  # (1, 2)
    std_c, std_r = torch.tensor([[0.1, 0.5]]), torch.tensor([[0.5, 0.1]])
    out = evaluate_heads(chosen, rejected, std_c, std_r, nominal_head=None, params=AggregationParams())
    assert out.aggregates["nominal"].value == 0.0  # 1.0 (head 0) against 9.0 (head 1)
    assert out.nominal == "argmin sigma"
    with pytest.raises(ValueError, match="pass chosen_std and rejected_std"):
        evaluate_heads(chosen, rejected, None, None, nominal_head=None, params=AggregationParams())
    with pytest.raises(ValueError, match=r"nominal_head must be in \[0, 2\)"):
        evaluate_heads(chosen, rejected, None, None, nominal_head=2, params=AggregationParams())


# ------------------------------------------------------------------------------------------- reader

MESSAGES_PROMPT = [{"role": "user", "content": "hi"}]
MESSAGES_GOOD = [{"role": "assistant", "content": "hello!"}]
MESSAGES_BAD = [{"role": "assistant", "content": "go away"}]


def write_jsonl(path: Path, records: list[object]) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_reader_accepts_every_trl_shape(tmp_path):
    path = write_jsonl(
        tmp_path / "pairs.jsonl.gz",
        [
            {"prompt": "hi", "chosen": "hello!", "rejected": "go away", "score": 3},
            {"prompt": MESSAGES_PROMPT, "chosen": MESSAGES_GOOD, "rejected": MESSAGES_BAD},
            {"chosen": MESSAGES_PROMPT + MESSAGES_GOOD, "rejected": MESSAGES_PROMPT + MESSAGES_BAD},
            "",
            {"chosen": "Human: hi Assistant: hello!", "rejected": "Human: hi Assistant: go away"},
        ],
    )
    pairs = read_preference_pairs(path)
    assert len(pairs) == 4
    assert pairs[0].chosen == PromptResponse(prompt="hi", response="hello!")
    assert pairs[0].rejected == PromptResponse(prompt="hi", response="go away")
    assert pairs[1].chosen == Messages(messages=MESSAGES_PROMPT + MESSAGES_GOOD)
    assert pairs[1].rejected == Messages(messages=MESSAGES_PROMPT + MESSAGES_BAD)
    assert pairs[2] == pairs[1]
    assert pairs[3].chosen == Text(text="Human: hi Assistant: hello!")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "Expecting property name"),
        ("[1, 2]", "expected a JSON object, got list"),
        (json.dumps({"chosen": "a"}), "missing key 'rejected'"),
        (json.dumps({"chosen": "a", "rejected": MESSAGES_BAD}), "both strings or both message lists"),
        (json.dumps({"prompt": "p", "chosen": MESSAGES_GOOD, "rejected": MESSAGES_BAD}), "all strings"),
        (
            json.dumps({"chosen": [{"role": "robot", "content": "x"}], "rejected": MESSAGES_BAD}),
            "messages.0.role",
        ),
        (json.dumps({"chosen": [], "rejected": []}), "invalid messages"),
        (json.dumps({"chosen": "", "rejected": "b"}), "invalid text"),
    ],
)
def test_reader_names_the_bad_line_and_the_accepted_shapes(tmp_path, line, message):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": "a", "rejected": "b"}, line])
    with pytest.raises(ValueError, match=message) as info:
        read_preference_pairs(path)
    assert f"{path}:2:" in str(info.value)
    assert "accepted shapes" in str(info.value)


def test_reader_refuses_empty_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="holds no preference pair"):
        read_preference_pairs(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(FileNotFoundError, match="not found"):
        read_preference_pairs(tmp_path / "missing.jsonl")
