"""Robust aggregates on hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from rmserve.aggregation import (
    AggregationParams,
    aggregate,
    aggregate_rows,
    brme_nominal_index,
    request_aggregates,
)
from rmserve.names import AGGREGATES


def test_every_aggregate_on_a_hand_computed_example():
    heads = torch.tensor([[1.0, 2.0, 3.0, 6.0], [-1.0, -1.0, -1.0, -1.0]])  # (2, 4)
    out = aggregate(heads, torch.tensor([3, 0]), AggregationParams(uwo_lambda=0.5, tradeoff_lambda=0.25))
    # row 0: mean 3, population variance (4 + 1 + 0 + 9) / 4 = 3.5
    assert out["mean"].tolist() == [3.0, -1.0]
    assert out["min"].tolist() == [1.0, -1.0]
    assert out["max"].tolist() == [6.0, -1.0]
    assert out["std"].tolist() == pytest.approx([math.sqrt(3.5), 0.0])
    assert out["uwo"].tolist() == [3.0 - 0.5 * 3.5, -1.0]
    assert out["nominal"].tolist() == [6.0, -1.0]
    assert out["tradeoff"].tolist() == [0.25 * 6.0 + 0.75 * 1.0, -1.0]


def test_one_head_every_aggregate_is_the_reward():
    heads = torch.tensor([[0.7], [-2.5]])
    out = aggregate(heads, torch.zeros(2, dtype=torch.long), AggregationParams())
    for name in ("mean", "min", "max", "uwo", "nominal", "tradeoff"):
        assert out[name].tolist() == pytest.approx([0.7, -2.5]), name
    assert out["std"].tolist() == [0.0, 0.0]


def test_a_subset_in_the_order_asked():
    out = aggregate(
        torch.ones(3, 2), torch.zeros(3, dtype=torch.long), AggregationParams(), ("tradeoff", "mean")
    )
    assert list(out) == ["tradeoff", "mean"]


def test_brme_nominal_is_the_smallest_sigma_first_of_ties():
    std = torch.tensor([[0.3, 0.1, 0.2], [0.5, 0.5, 0.9], [0.2, 0.2, 0.2]])
    assert brme_nominal_index(std).tolist() == [1, 0, 0]


def test_large_magnitudes_stay_finite_in_float32():
    heads = torch.tensor([[1e18, -1e18]], dtype=torch.float32)
    out = aggregate(heads, torch.tensor([0]), AggregationParams(uwo_lambda=0.0))
    assert out["mean"].item() == 0.0
    assert out["std"].item() == pytest.approx(1e18, rel=1e-6)
    assert out["uwo"].item() == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"uwo_lambda": -0.1}, "uwo_lambda must be a finite number >= 0"),
        ({"uwo_lambda": float("nan")}, "uwo_lambda must be a finite number >= 0"),
        ({"tradeoff_lambda": 1.5}, r"tradeoff_lambda must lie in \[0, 1\]"),
        ({"tradeoff_lambda": float("nan")}, r"tradeoff_lambda must lie in \[0, 1\]"),
    ],
)
def test_invalid_lambdas(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AggregationParams(**kwargs)


def test_unknown_aggregate_and_bad_shapes():
    with pytest.raises(ValueError, match="unknown aggregate 'median'"):
        aggregate(torch.ones(1, 2), torch.zeros(1, dtype=torch.long), AggregationParams(), ("median",))
    with pytest.raises(ValueError, match=r"heads must be \(B, k\)"):
        aggregate(torch.ones(2), torch.zeros(2, dtype=torch.long), AggregationParams())
    assert set(AGGREGATES) == {"mean", "min", "max", "std", "uwo", "nominal", "tradeoff"}


def _table(heads: torch.Tensor, nominal: torch.Tensor, params: AggregationParams) -> torch.Tensor:
    rows = heads.shape[0]
    lam_u, lam_t = torch.full((rows,), params.uwo_lambda), torch.full((rows,), params.tradeoff_lambda)
    return aggregate_rows(heads, nominal, lam_u, lam_t)


def test_request_tradeoff_takes_the_head_with_the_lowest_mean_over_the_request():
    # Three inputs, three heads. Per input the min is head 2, head 0, head 1; over the request the head
    # means are (2, 1, 2): k* = 1. Nominal heads: 0, 0, 2.
    heads = torch.tensor([[4.0, 2.0, 1.0], [-1.0, 0.0, 2.0], [3.0, 1.0, 3.0]])  # (3, 3)
    nominal = torch.tensor([0, 0, 2])
    params = AggregationParams(tradeoff_lambda=0.4)
    table = _table(heads, nominal, params)
    used, out = request_aggregates(heads, table, params, scope="request")
    tradeoff = out[:, AGGREGATES.index("tradeoff")].tolist()
    # lambda * nominal + (1 - lambda) * head k* = 1
    assert tradeoff == pytest.approx([0.4 * 4 + 0.6 * 2, 0.4 * -1 + 0.6 * 0, 0.4 * 3 + 0.6 * 1])
    assert torch.equal(used, heads)
    # the per-input form, for contrast: the min over heads of each input
    per_input = request_aggregates(heads, table, params, scope="input")[1][:, AGGREGATES.index("tradeoff")]
    assert per_input.tolist() == pytest.approx([0.4 * 4 + 0.6 * 1, 0.4 * -1 + 0.6 * -1, 0.4 * 3 + 0.6 * 1])
    # every other column is untouched
    others = [i for i, name in enumerate(AGGREGATES) if name != "tradeoff"]
    assert torch.equal(out[:, others], table[:, others])


def test_request_tradeoff_of_one_head_is_the_reward_and_of_no_input_is_empty():
    heads = torch.tensor([[0.5], [-2.0]])
    table = _table(heads, torch.zeros(2, dtype=torch.long), AggregationParams())
    out = request_aggregates(heads, table, AggregationParams(), scope="request")[1]
    assert out[:, AGGREGATES.index("tradeoff")].tolist() == [0.5, -2.0]
    empty = request_aggregates(
        torch.zeros(0, 3), torch.zeros(0, len(AGGREGATES)), AggregationParams(), scope="request"
    )
    assert empty[1].shape == (0, len(AGGREGATES))


def test_brme_samples_are_mu_plus_a_sigma_with_a_seeded_normal_and_aggregates_follow_them():
    mu = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    sigma = torch.tensor([[0.5, 0.1], [0.2, 0.3]])
    params = AggregationParams(uwo_lambda=0.5, tradeoff_lambda=0.6)
    table = _table(mu, brme_nominal_index(sigma), params)
    used, out = request_aggregates(mu, table, params, head_std=sigma, sample_seed=1234)
    a = torch.randn((2, 2), generator=torch.Generator().manual_seed(1234))
    torch.testing.assert_close(used, mu + a * sigma)
    # aggregates of the samples; the nominal head is still the smallest sigma: head 1, head 0
    torch.testing.assert_close(out, _table(used, torch.tensor([1, 0]), params))
    assert out[:, AGGREGATES.index("nominal")].tolist() == [used[0, 1].item(), used[1, 0].item()]
    again = request_aggregates(mu, table, params, head_std=sigma, sample_seed=1234)
    assert torch.equal(again[0], used)  # the seed repeats the draws
    other = request_aggregates(mu, table, params, head_std=sigma, sample_seed=1235)
    assert not torch.equal(other[0], used)
    with pytest.raises(ValueError, match="needs each head's sigma"):
        request_aggregates(mu, table, params, sample_seed=1)
