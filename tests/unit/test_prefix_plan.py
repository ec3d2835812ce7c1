"""Prefix plans: which rows of a batch share which prefix, and how their suffixes are batched."""

from __future__ import annotations

import random

import pytest

from rmserve.batching.planning import UNLIMITED, BatchLimits
from rmserve.batching.prefix import PrefixGroup, common_prefix, plan_prefixes, prefix_key

pytestmark = pytest.mark.unit

WIDE = BatchLimits(8192, 64, UNLIMITED)


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([5], [6]) == 0


def test_responses_to_one_prompt_form_one_group_and_others_run_whole():
    prompt = list(range(100, 140))  # 40 tokens
    rows = [[*prompt, 1, 2], [*prompt, 3], [7] * 50, [*prompt, 4, 5, 6], [8] * 10]
    plan = plan_prefixes(rows, 8, WIDE)
    assert plan.groups == (PrefixGroup((0, 1, 3), 40, ((1, 0, 3),)),)  # suffixes in length order
    assert plan.rest == (2, 4)
    assert plan.reused_tokens == 80


def test_each_row_keeps_a_token_of_its_own():
    rows = [[1] * 20, [1] * 20, [1] * 25]  # two identical inputs and one that extends them
    plan = plan_prefixes(rows, 8, WIDE)
    assert plan.groups == (PrefixGroup((0, 1, 2), 19, ((0, 1, 2),)),)


def test_a_prefix_shorter_than_the_minimum_is_not_shared():
    rows = [[1] * 7 + [2], [1] * 7 + [3]]
    assert plan_prefixes(rows, 8, WIDE).groups == ()
    assert plan_prefixes(rows, 7, WIDE).groups == (PrefixGroup((0, 1), 7, ((0, 1),)),)
    assert plan_prefixes([[1] * 8, [1] * 9], 8, WIDE).groups == ()  # the 8-token row cannot keep a token


def test_a_weak_common_link_splits_into_the_longer_prefixes():
    system = [9] * 10
    a, b = system + [1] * 50, system + [2] * 50
    rows = [[*a, 3], [*b, 4], [*a, 5], [*b, 6]]
    plan = plan_prefixes(rows, 8, WIDE)
    assert sorted(g.rows for g in plan.groups) == [(0, 2), (1, 3)]
    assert {g.prefix for g in plan.groups} == {60}
    # splitting saves 60 + 9 x 10 tokens where one group of all twelve saves 11 x 10
    rows = [[*system, k, k + 1] for k in range(20, 40, 2)] + [[*a, 3], [*a, 4]]
    plan = plan_prefixes(rows, 8, WIDE)
    assert sorted((len(g.rows), g.prefix) for g in plan.groups) == [(2, 60), (10, 10)]
    # one group of all twelve saves 11 x 10 tokens, more than 14 + 9 x 10 apart
    rows = [[*system, k, k + 1] for k in range(20, 40, 2)] + [system + [1] * 4 + [3], system + [1] * 4 + [4]]
    plan = plan_prefixes(rows, 8, WIDE)
    assert [(len(g.rows), g.prefix) for g in plan.groups] == [(12, 10)]


def test_suffixes_are_batched_by_the_padding_rule():
    prompt = [5] * 30
    rows = [prompt + [1] * n for n in (4, 40, 5, 41)]
    plan = plan_prefixes(rows, 8, BatchLimits(8192, 64, 2))
    assert plan.groups[0].suffix_batches == ((0, 2), (1, 3))
    plan = plan_prefixes(rows, 8, BatchLimits(8192, 2, UNLIMITED))
    assert all(len(batch) <= 2 for batch in plan.groups[0].suffix_batches)


def test_random_plans_cover_every_row_once_with_true_prefixes():
    rng = random.Random(0)
    prompts = [[rng.randrange(50) for _ in range(rng.randint(0, 40))] for _ in range(5)]
    for _ in range(200):
        rows = [
            rng.choice(prompts) + [rng.randrange(50) for _ in range(rng.randint(1, 9))]
            for _ in range(rng.randint(1, 30))
        ]
        plan = plan_prefixes(rows, rng.randint(1, 12), WIDE)
        seen = [r for g in plan.groups for r in g.rows] + list(plan.rest)
        assert sorted(seen) == list(range(len(rows)))
        for g in plan.groups:
            assert len(g.rows) >= 2 and sorted(r for b in g.suffix_batches for r in b) == list(g.rows)
            for r in g.rows:
                assert rows[r][: g.prefix] == rows[g.rows[0]][: g.prefix] and len(rows[r]) > g.prefix


def test_a_long_batch_plans_without_recursion():
    rows = [[1] * k + [2] for k in range(40, 3040)]  # 3000 rows, each link longer than the last
    plan = plan_prefixes(rows, 8, BatchLimits(1 << 30, 1 << 30, UNLIMITED))
    assert sum(len(g.rows) for g in plan.groups) + len(plan.rest) == 3000


def test_prefix_key():
    assert prefix_key([1, 2, 3], 2) == (1, 2)
    assert prefix_key([1, 2], 2) is None


def test_min_tokens_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        plan_prefixes([[1, 2]], 0, WIDE)
