"""Batch planning: which queued items run together."""

from __future__ import annotations

import random

import pytest

from rmserve.batching.planning import BatchLimits, grow_batch, padded_tokens, plan_offline


def test_padded_tokens():
    assert padded_tokens([3, 7, 5]) == 21
    assert padded_tokens([]) == 0


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        BatchLimits(0, 4)


def test_grow_batch_takes_the_neighbours_that_add_least_padding():
    lengths = [10, 100, 11, 9, 50, 12]
    # around the oldest (10): 9, 11, 12 are cheap; 50 and 100 would pad everyone
    assert grow_batch(lengths, 0, BatchLimits(60, 4)) == [3, 0, 2, 5]
    assert grow_batch(lengths, 0, BatchLimits(10_000, 6)) == [3, 0, 2, 5, 4, 1]


def test_grow_batch_respects_the_padded_budget_and_size():
    lengths = [10, 11, 12, 13, 14]
    assert grow_batch(lengths, 2, BatchLimits(35, 10)) == [1, 2]  # a third row makes 3 x 12 = 36
    assert grow_batch(lengths, 2, BatchLimits(36, 10)) == [0, 1, 2]
    assert grow_batch(lengths, 2, BatchLimits(52, 10)) == [0, 1, 2, 3]  # 4 x 13
    assert len(grow_batch(lengths, 0, BatchLimits(10_000, 2))) == 2


def test_join_padding_keeps_inputs_that_would_pad_too_much_out():
    lengths = [100, 104, 130, 96, 300]
    # 104 adds 4 (to the 100 already in), 96 adds 4; 130 would add 3 x 26 = 78 > 10
    assert grow_batch(lengths, 0, BatchLimits(10_000, 8, max_join_padding=10)) == [3, 0, 1]
    assert grow_batch(lengths, 0, BatchLimits(10_000, 8, max_join_padding=0)) == [0]
    assert plan_offline(lengths, BatchLimits(10_000, 8, max_join_padding=10)) == [[3, 0, 1], [2], [4]]
    with pytest.raises(ValueError, match="max_join_padding"):
        BatchLimits(1, 1, max_join_padding=-1)


def test_the_anchor_is_served_even_alone_over_budget():
    assert grow_batch([500, 3, 4], 0, BatchLimits(100, 8)) == [0]


def test_ties_are_deterministic():
    lengths = [5, 5, 5, 5]
    assert grow_batch(lengths, 2, BatchLimits(10, 8)) == [1, 2]
    assert grow_batch(lengths, 2, BatchLimits(10, 8)) == grow_batch(lengths, 2, BatchLimits(10, 8))


def test_plan_offline_covers_every_item_once_within_limits():
    lengths = [7, 3, 30, 3, 12, 12, 1]
    batches = plan_offline(lengths, BatchLimits(36, 3))
    assert batches == [[6, 1, 3], [0, 4, 5], [2]]
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))


def test_random_invariants():
    rng = random.Random(7)
    for _ in range(300):
        lengths = [rng.randint(1, 200) for _ in range(rng.randint(1, 60))]
        limits = BatchLimits(rng.randint(50, 4000), rng.randint(1, 32), rng.choice([0, 8, 64, 10**9]))
        anchor = rng.randrange(len(lengths))
        chosen = grow_batch(lengths, anchor, limits)
        assert anchor in chosen
        assert len(set(chosen)) == len(chosen) <= limits.max_batch_size
        if len(chosen) > 1:
            assert padded_tokens([lengths[i] for i in chosen]) <= limits.max_batch_tokens
        assert [lengths[i] for i in chosen] == sorted(lengths[i] for i in chosen)
        if limits.max_join_padding == 0:
            assert len({lengths[i] for i in chosen}) == 1
        batches = plan_offline(lengths, limits)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b in batches:
            assert len(b) <= limits.max_batch_size
            assert len(b) == 1 or padded_tokens([lengths[i] for i in b]) <= limits.max_batch_tokens
