"""Batch planning: which queued items run together (pure functions of lengths, exact answers)."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest

from rmserve.batching.planning import UNLIMITED, BatchLimits, grow_batch, padded_tokens, plan_offline

pytestmark = pytest.mark.unit


def by_length(lengths: list[int]) -> list[int]:
    """Indices in the order the planner considers them: by length, ties by index."""
    return sorted(range(len(lengths)), key=lambda i: (lengths[i], i))


# --- padded_tokens -------------------------------------------------------------------------------


def test_padded_tokens_is_count_times_longest():
    assert padded_tokens([3, 7, 5]) == 21
    assert padded_tokens([4]) == 4
    assert padded_tokens([2, 2, 2, 2]) == 8
    assert padded_tokens([]) == 0


# --- BatchLimits ----------------------------------------------------------------------------------


def test_limits_default_to_unlimited_join_padding():
    assert BatchLimits(100, 4) == BatchLimits(100, 4, max_join_padding=UNLIMITED)


@pytest.mark.parametrize("tokens, size", [(0, 4), (4, 0), (-1, 4), (4, -3)])
def test_limits_tokens_and_size_must_be_positive(tokens, size):
    with pytest.raises(ValueError, match=r"^max_batch_tokens and max_batch_size must be at least 1\.$"):
        BatchLimits(tokens, size)


def test_limits_join_padding_must_not_be_negative():
    with pytest.raises(ValueError, match=r"^max_join_padding must be at least 0\.$"):
        BatchLimits(1, 1, max_join_padding=-1)
    assert BatchLimits(1, 1, max_join_padding=0).max_join_padding == 0


def test_limits_are_frozen():
    limits = BatchLimits(10, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        limits.max_batch_size = 3  # type: ignore[misc]


def test_admits_checks_each_cap_at_its_boundary():
    limits = BatchLimits(10, 3, max_join_padding=4)
    assert limits.admits(1, 5, 0) is True  # 2 x 5 = 10: exactly the budget
    assert limits.admits(1, 6, 0) is False  # 2 x 6 = 12
    assert limits.admits(2, 3, 0) is True  # a third item: 3 x 3 = 9
    assert limits.admits(3, 1, 0) is False  # already max_batch_size items
    assert limits.admits(1, 5, 4) is True  # padding exactly the cap
    assert limits.admits(1, 5, 5) is False


# --- grow_batch -----------------------------------------------------------------------------------


def test_grow_batch_takes_the_neighbours_that_add_least_padding():
    lengths = [10, 100, 11, 9, 50, 12]
    # around the oldest (10): 9, 11, 12 are cheap; 50 and 100 would pad everyone
    assert grow_batch(lengths, 0, BatchLimits(60, 4)) == [3, 0, 2, 5]
    assert grow_batch(lengths, 0, BatchLimits(10_000, 6)) == [3, 0, 2, 5, 4, 1]


def test_grow_batch_weighs_a_longer_item_by_the_rows_it_pads():
    # anchor 20: 21 (+1) then 22 (+2 x 1) join from above; then 26 would pad 3 rows by 4 (+12)
    # while 15 only pads itself up to 22 (+7), so the shorter one joins first
    lengths = [20, 21, 22, 26, 15]
    assert grow_batch(lengths, 0, BatchLimits(10_000, 2)) == [0, 1]
    assert grow_batch(lengths, 0, BatchLimits(10_000, 3)) == [0, 1, 2]
    assert grow_batch(lengths, 0, BatchLimits(10_000, 4)) == [4, 0, 1, 2]
    assert grow_batch(lengths, 0, BatchLimits(10_000, 5)) == [4, 0, 1, 2, 3]


def test_grow_batch_respects_the_padded_budget_and_size():
    lengths = [10, 11, 12, 13, 14]
    assert grow_batch(lengths, 2, BatchLimits(35, 10)) == [1, 2]  # a third row makes 3 x 12 = 36
    assert grow_batch(lengths, 2, BatchLimits(36, 10)) == [0, 1, 2]
    assert grow_batch(lengths, 2, BatchLimits(52, 10)) == [0, 1, 2, 3]  # 4 x 13
    assert grow_batch(lengths, 2, BatchLimits(70, 10)) == [0, 1, 2, 3, 4]  # 5 x 14
    assert grow_batch(lengths, 0, BatchLimits(10_000, 2)) == [0, 1]
    assert grow_batch(lengths, 4, BatchLimits(10_000, 2)) == [3, 4]
    assert grow_batch(lengths, 2, BatchLimits(10_000, 1)) == [2]


def test_grow_batch_takes_the_feasible_neighbour_when_the_cheaper_one_is_over_budget():
    # anchor 10: 11 adds 1 padding but makes 2 x 11 = 22 tokens; 5 adds 5 but keeps 2 x 10 = 20
    lengths = [10, 11, 5]
    assert grow_batch(lengths, 0, BatchLimits(22, 8)) == [0, 1]  # then 5 would make 3 x 11 = 33
    assert grow_batch(lengths, 0, BatchLimits(20, 8)) == [2, 0]
    assert grow_batch(lengths, 0, BatchLimits(19, 8)) == [0]


def test_grow_batch_anchor_is_served_even_alone_over_budget():
    assert grow_batch([500, 3, 4], 0, BatchLimits(100, 8)) == [0]
    assert grow_batch([7], 0, BatchLimits(1, 1)) == [0]
    # the over-budget anchor still stays alone even when its neighbours are tiny and equal-length
    assert grow_batch([3, 500, 500], 1, BatchLimits(100, 8)) == [1]


def test_grow_batch_join_padding_keeps_inputs_that_would_pad_too_much_out():
    lengths = [100, 104, 130, 96, 300]
    # 104 adds 4 (to the 100 already in), 96 adds 4; 130 would add 3 x 26 = 78 > 10
    assert grow_batch(lengths, 0, BatchLimits(10_000, 8, max_join_padding=10)) == [3, 0, 1]
    assert grow_batch(lengths, 0, BatchLimits(10_000, 8, max_join_padding=78)) == [3, 0, 1, 2]
    assert grow_batch(lengths, 0, BatchLimits(10_000, 8, max_join_padding=0)) == [0]
    assert grow_batch([5, 5, 6, 5], 0, BatchLimits(10_000, 8, max_join_padding=0)) == [0, 1, 3]


def test_grow_batch_ties_are_deterministic():
    # equal padding: the shorter neighbour (lower in length order) wins
    assert grow_batch([4, 5, 6], 1, BatchLimits(10_000, 2)) == [0, 1]
    # equal lengths: the length order breaks ties by index, and the lower side wins
    lengths = [5, 5, 5, 5]
    assert grow_batch(lengths, 2, BatchLimits(10, 8)) == [1, 2]
    assert grow_batch(lengths, 2, BatchLimits(15, 8)) == [0, 1, 2]
    assert grow_batch(lengths, 2, BatchLimits(20, 8)) == [0, 1, 2, 3]
    assert grow_batch(lengths, 0, BatchLimits(10, 8)) == [0, 1]
    assert all(grow_batch(lengths, 2, BatchLimits(10, 8)) == [1, 2] for _ in range(5))


def test_grow_batch_returns_indices_in_length_order():
    lengths = [8, 2, 6, 4]
    assert grow_batch(lengths, 0, BatchLimits(10_000, 4)) == [1, 3, 2, 0]


# --- plan_offline ---------------------------------------------------------------------------------


def test_plan_offline_covers_every_item_once_within_limits():
    lengths = [7, 3, 30, 3, 12, 12, 1]
    batches = plan_offline(lengths, BatchLimits(36, 3))
    assert batches == [[6, 1, 3], [0, 4, 5], [2]]
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))


def test_plan_offline_gives_an_over_budget_item_its_own_batch():
    assert plan_offline([1, 50, 1, 2], BatchLimits(10, 8)) == [[0, 2, 3], [1]]


def test_plan_offline_cuts_at_max_batch_size():
    assert plan_offline([1] * 5, BatchLimits(10_000, 2)) == [[0, 1], [2, 3], [4]]


def test_plan_offline_join_padding():
    lengths = [100, 104, 130, 96, 300]
    assert plan_offline(lengths, BatchLimits(10_000, 8, max_join_padding=10)) == [[3, 0, 1], [2], [4]]
    assert plan_offline([5, 5, 6, 5], BatchLimits(10_000, 8, max_join_padding=0)) == [[0, 1, 3], [2]]


def test_plan_offline_of_nothing_is_no_batches():
    assert plan_offline([], BatchLimits(10, 2)) == []


# --- invariants over random inputs ----------------------------------------------------------------


def random_case(rng: random.Random) -> tuple[list[int], BatchLimits]:
    lengths = [rng.randint(1, 200) for _ in range(rng.randint(1, 60))]
    limits = BatchLimits(rng.randint(1, 4000), rng.randint(1, 32), rng.choice([0, 1, 8, 64, 1000, UNLIMITED]))
    return lengths, limits


def test_grow_batch_invariants_on_random_inputs():
    rng = random.Random(20240611)
    for _ in range(2000):
        lengths, limits = random_case(rng)
        anchor = rng.randrange(len(lengths))
        chosen = grow_batch(lengths, anchor, limits)
        widths = [lengths[i] for i in chosen]
        assert anchor in chosen
        assert len(set(chosen)) == len(chosen)
        assert widths == sorted(widths)
        # a contiguous run of the length order
        order = by_length(lengths)
        lo = order.index(chosen[0])
        hi = lo + len(chosen) - 1
        assert order[lo : hi + 1] == chosen
        if len(chosen) > 1:
            assert len(chosen) <= limits.max_batch_size
            assert padded_tokens(widths) <= limits.max_batch_tokens
        # maximal: neither neighbour in length order would be admitted
        longest = max(widths)
        if lo > 0:
            n = lengths[order[lo - 1]]
            assert not limits.admits(len(chosen), longest, longest - n)
        if hi < len(order) - 1:
            n = lengths[order[hi + 1]]
            assert not limits.admits(len(chosen), n, len(chosen) * (n - longest))


def test_plan_offline_invariants_on_random_inputs():
    rng = random.Random(1234)
    for _ in range(2000):
        lengths, limits = random_case(rng)
        batches = plan_offline(lengths, limits)
        # every index exactly once; batches are consecutive runs of the length order
        assert [i for b in batches for i in b] == by_length(lengths)
        for b in batches:
            widths = [lengths[i] for i in b]
            assert widths == sorted(widths)
            if len(b) > 1:
                assert len(b) <= limits.max_batch_size
                assert padded_tokens(widths) <= limits.max_batch_tokens
            for k in range(1, len(b)):  # each joining item padded the rows before it at most the cap
                assert k * (widths[k] - widths[k - 1]) <= limits.max_join_padding
        # greedy: the first item of each batch could not have joined the batch before it
        for prev, nxt in itertools.pairwise(batches):
            n = lengths[nxt[0]]
            longest = lengths[prev[-1]]
            assert not limits.admits(len(prev), n, len(prev) * (n - longest))
