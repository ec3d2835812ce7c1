"""The exact-duplicate cache: keys that tell inputs apart, and least-recently-used eviction."""

from __future__ import annotations

import pytest

from rmserve.aggregation import AggregationParams
from rmserve.models.ensemble import MemberInputs
from rmserve.models.inputs import EncodedInput
from rmserve.scoring.duplicates import DuplicateCache, input_digest

pytestmark = pytest.mark.unit

P = AggregationParams(0.5, 0.4)


def enc(ids, types=None) -> EncodedInput:
    return EncodedInput(tuple(ids), None if types is None else tuple(types), False)


def test_the_key_is_the_tokens_and_the_lambdas():
    key = input_digest(enc([1, 2, 3]), P)
    assert key is not None and len(key) == 16
    assert input_digest(enc([1, 2, 3]), AggregationParams(0.5, 0.4)) == key
    others = [
        input_digest(enc([1, 2, 4]), P),
        input_digest(enc([1, 2]), P),
        input_digest(enc([1, 2, 3]), AggregationParams(0.6, 0.4)),
        input_digest(enc([1, 2, 3]), AggregationParams(0.5, 0.3)),
        input_digest(enc([1, 2, 3], [0, 0, 1]), P),
        input_digest(MemberInputs((enc([1, 2, 3]), enc([4]))), P),
    ]
    assert len({key, *others}) == 7
    # member boundaries count: ([1, 2], [3]) is not ([1], [2, 3])
    assert input_digest(MemberInputs((enc([1, 2]), enc([3]))), P) != input_digest(
        MemberInputs((enc([1]), enc([2, 3]))), P
    )


def test_the_least_recently_used_entry_goes_first():
    cache: DuplicateCache[str] = DuplicateCache(2)
    cache.put(b"a", "A")
    cache.put(b"b", "B")
    assert cache.get(b"a") == "A"  # a is now the most recently used
    cache.put(b"c", "C")
    assert (cache.get(b"a"), cache.get(b"b"), cache.get(b"c"), len(cache)) == ("A", None, "C", 2)


def test_a_cache_holds_at_least_one_entry():
    with pytest.raises(ValueError, match="at least one entry"):
        DuplicateCache(0)
