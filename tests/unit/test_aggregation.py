"""Robust aggregates on hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from rmserve.aggregation import AggregationParams, aggregate, brme_nominal_index
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
