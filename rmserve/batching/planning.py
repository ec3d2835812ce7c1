"""Batch formation as pure functions of sequence lengths: which items go together.

A batch is right-padded to its longest item, so its cost is ``len(batch) * max(lengths)`` tokens:
the budget ``max_batch_tokens`` counts that padded size, not just the real tokens.

Whether an input should join a batch at all is a trade: joining saves one forward pass (its fixed
cost: reading every weight, launching every layer) but computes the padding it adds. ``max_join_padding``
is that fixed cost expressed in tokens: an input joins only if it adds at most that many padding tokens.
On a GPU a forward's fixed cost is worth thousands of tokens (batch almost anything); on a CPU only
tens, where padding is nearly pure loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

UNLIMITED = 1 << 30


@dataclass(frozen=True)
class BatchLimits:
    """Caps on one batch.

    Attributes:
        max_batch_tokens: padded tokens per batch (``items * longest``).
        max_batch_size: items per batch.
        max_join_padding: the most padding tokens one input may add to a batch by joining it.
    """

    max_batch_tokens: int
    max_batch_size: int
    max_join_padding: int = UNLIMITED

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1 or self.max_batch_size < 1:
            raise ValueError("max_batch_tokens and max_batch_size must be at least 1.")
        if self.max_join_padding < 0:
            raise ValueError("max_join_padding must be at least 0.")

    def admits(self, count: int, longest: int, added_padding: int) -> bool:
        """Whether a batch of ``count`` items may take one more, making it ``longest`` wide."""
        return (
            count < self.max_batch_size
            and longest * (count + 1) <= self.max_batch_tokens
            and added_padding <= self.max_join_padding
        )


def padded_tokens(lengths: Sequence[int]) -> int:
    """Tokens a right-padded batch of these lengths computes."""
    return len(lengths) * max(lengths) if lengths else 0


def grow_batch(lengths: Sequence[int], anchor: int, limits: BatchLimits) -> list[int]:
    """Choose a batch around ``anchor`` (the oldest waiting item) that wastes the least padding.

    The items are considered in length order; starting from the anchor, the batch grows one
    neighbour at a time, taking whichever of the next shorter or next longer item adds fewer padding
    tokens, while the padded size fits ``max_batch_tokens``, the count fits ``max_batch_size`` and the
    added padding is at most ``max_join_padding``.
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
    while True:
        options = []
        if lo > 0:  # a shorter item: the width stays, it pads itself up to it
            n = lengths[order[lo - 1]]
            options.append((longest - n, -1, longest))
        if hi < len(order) - 1:  # a longer item: every row already in pads up to it
            n = lengths[order[hi + 1]]
            options.append((count * (n - longest), 1, n))
        feasible = [o for o in options if limits.admits(count, o[2], o[0])]
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
        if current and not limits.admits(
            len(current), lengths[i], len(current) * (lengths[i] - lengths[current[-1]])
        ):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
