"""Batch formation as pure functions of sequence lengths: which items go together.

A batch is right-padded to its longest item, so its cost is ``len(batch) * max(lengths)`` tokens:
the budget ``max_batch_tokens`` counts that padded size, not just the real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchLimits:
    """Caps on one batch.

    Attributes:
        max_batch_tokens: padded tokens per batch (``items * longest``).
        max_batch_size: items per batch.
    """

    max_batch_tokens: int
    max_batch_size: int

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1 or self.max_batch_size < 1:
            raise ValueError("max_batch_tokens and max_batch_size must be at least 1.")


def padded_tokens(lengths: Sequence[int]) -> int:
    """Tokens a right-padded batch of these lengths computes."""
    return len(lengths) * max(lengths) if lengths else 0


def grow_batch(lengths: Sequence[int], anchor: int, limits: BatchLimits) -> list[int]:
    """Choose a batch around ``anchor`` (the oldest waiting item) that wastes the least padding.

    The items are considered in length order; starting from the anchor, the batch grows one
    neighbour at a time, taking whichever of the next shorter or next longer item adds fewer padding
    tokens, while the padded size fits ``max_batch_tokens`` and the count fits ``max_batch_size``.
    The anchor is always in the batch (even alone over the budget), so no item starves.

    Args:
        lengths: token counts of the waiting items, in any order.
        anchor: index (into ``lengths``) of the item that must be served.
        limits: the batch caps.

    Returns:
        Indices into ``lengths`` of the chosen items, in length order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    pos = order.index(anchor)
    lo = hi = pos
    longest = lengths[anchor]
    count = 1
    while count < limits.max_batch_size:
        options = []
        if lo > 0:  # a shorter item: the width stays, it pads itself up to it
            n = lengths[order[lo - 1]]
            options.append((longest - n, -1, longest))
        if hi < len(order) - 1:  # a longer item: every row already in pads up to it
            n = lengths[order[hi + 1]]
            options.append((count * (n - longest), 1, n))
        feasible = [o for o in options if o[2] * (count + 1) <= limits.max_batch_tokens]
        if not feasible:
            break
        _, side, width = min(feasible)
        if side < 0:
            lo -= 1
        else:
            hi += 1
        longest = width
        count += 1
    return order[lo : hi + 1]


def plan_offline(lengths: Sequence[int], limits: BatchLimits) -> list[list[int]]:
    """Cut all items into batches for offline scoring: sort by length, fill each batch greedily.

    Returns:
        Batches of indices into ``lengths``; every index appears exactly once.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # sorted ascending, so the newest item is the longest of the batch
        if current and (
            len(current) >= limits.max_batch_size or lengths[i] * (len(current) + 1) > limits.max_batch_tokens
        ):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
