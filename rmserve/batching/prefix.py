"""Prefix sharing as pure functions of token ids: which inputs of a batch compute a shared prefix once.

GRPO, RLOO and best-of-n score G responses to one prompt, so G inputs begin with the same tokens (the
rendered prompt). A decoder computes those tokens identically for each of them (causal attention: a
token never sees what follows it), so the prefix can run once, and each input's remaining tokens (its
suffix) run against the prefix's cached keys and values. The result equals the full forward.

A plan groups a batch's rows: within a group every row starts with the group's ``prefix`` tokens and
keeps at least one token of its own. Rows are grouped to save the most prefix tokens: sorted by their
token ids, two neighbours share their longest common prefix, and a run of rows shares the smallest of
its neighbours' prefixes; a run splits at that weakest link when its two halves save more apart. A group
whose prefix is shorter than ``min_tokens`` is not worth a forward of its own and is not formed.

Each group's suffixes are cut into batches with ``plan_offline`` under the model's batch limits, each
suffix counted with the prefix it attends to (``prefix + suffix`` tokens wide): a suffix forward then
holds no more keys, values and mask than a whole-input forward within the limits, and padding among
suffixes follows the same rule as padding among whole inputs.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from rmserve.batching.planning import BatchLimits, plan_offline


@dataclass(frozen=True)
class PrefixGroup:
    """Rows of a batch that share their first ``prefix`` tokens.

    Attributes:
        rows: the rows (indices into the batch), at least two.
        prefix: tokens every row starts with; each row is longer.
        suffix_batches: the rows cut into suffix forwards (each a list of rows).
    """

    rows: tuple[int, ...]
    prefix: int
    suffix_batches: tuple[tuple[int, ...], ...]

    @property
    def reused_tokens(self) -> int:
        """Prefix tokens not recomputed: every row but the first reuses the prefix."""
        return (len(self.rows) - 1) * self.prefix


@dataclass(frozen=True)
class PrefixPlan:
    """How a batch runs: its prefix groups, and the rows that run whole (one right-padded forward).

    Attributes:
        groups: rows computed from a shared prefix.
        rest: rows computed whole, in batch order.
    """

    groups: tuple[PrefixGroup, ...]
    rest: tuple[int, ...]

    @property
    def reused_tokens(self) -> int:
        """Prefix tokens the plan does not recompute."""
        return sum(g.reused_tokens for g in self.groups)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _weakest(links: Sequence[int], lo: int, hi: int) -> int:
    """The first weakest link between sorted rows ``lo..hi`` (``links[k]`` joins rows k and k + 1)."""
    return min(range(lo, hi), key=lambda k: (links[k], k))


def _split(links: Sequence[int], lo: int, hi: int, min_tokens: int) -> list[tuple[int, int, int]]:
    """The grouping of sorted rows ``lo..hi`` (inclusive) that saves the most prefix tokens: [(lo, hi, prefix)].

    A run either shares its weakest link's prefix as one group, or splits there; post-order over the
    splits, iteratively (a batch may be longer than Python's recursion limit).
    """
    best: dict[tuple[int, int], tuple[int, list[tuple[int, int, int]]]] = {}
    stack = [(lo, hi, False)]
    while stack:
        a, b, expanded = stack.pop()
        if a == b:
            best[(a, b)] = (0, [])
            continue
        k = _weakest(links, a, b)
        if not expanded:
            stack += [(a, b, True), (a, k, False), (k + 1, b, False)]
            continue
        left_saved, left = best.pop((a, k))
        right_saved, right = best.pop((k + 1, b))
        joint = (b - a) * links[k] if links[k] >= min_tokens else 0
        if joint > 0 and joint >= left_saved + right_saved:
            best[(a, b)] = (joint, [(a, b, links[k])])
        else:
            best[(a, b)] = (left_saved + right_saved, left + right)
    return best[(lo, hi)][1]


def plan_prefixes(token_ids: Sequence[Sequence[int]], min_tokens: int, limits: BatchLimits) -> PrefixPlan:
    """Group a batch's rows by shared prefix (see the module docstring).

    Args:
        token_ids: each row's token ids.
        min_tokens: the shortest prefix worth sharing (at least 1).
        limits: the model's batch limits, which cut each group's suffixes into forwards.

    Returns:
        The plan; rows in no group are in ``rest``.
    """
    if min_tokens < 1:
        raise ValueError("min_tokens must be at least 1; prefix sharing off means no plan at all.")
    candidates = sorted(
        (row for row, ids in enumerate(token_ids) if len(ids) > min_tokens),
        key=lambda row: (tuple(token_ids[row]), row),
    )
    # each row keeps at least one token of its own: a link is capped below both rows' lengths
    links = [
        min(common_prefix(token_ids[a], token_ids[b]), len(token_ids[a]) - 1, len(token_ids[b]) - 1)
        for a, b in itertools.pairwise(candidates)
    ]
    groups: list[PrefixGroup] = []
    grouped: set[int] = set()
    start = 0
    for end in range(len(candidates)):  # runs of rows joined by links of at least min_tokens
        if end + 1 < len(candidates) and links[end] >= min_tokens:
            continue
        for lo, hi, prefix in _split(links, start, end, min_tokens):
            rows = tuple(sorted(candidates[lo : hi + 1]))
            spans = [len(token_ids[row]) for row in rows]  # prefix + suffix: what each suffix attends over
            batches = tuple(tuple(rows[i] for i in batch) for batch in plan_offline(spans, limits))
            groups.append(PrefixGroup(rows, prefix, batches))
            grouped.update(rows)
        start = end + 1
    rest = tuple(row for row in range(len(token_ids)) if row not in grouped)
    return PrefixPlan(tuple(groups), rest)


def prefix_key(token_ids: Sequence[int], min_tokens: int) -> Hashable | None:
    """What the batcher groups queued inputs by: their first ``min_tokens`` tokens (None: too short to share)."""
    if len(token_ids) <= min_tokens:
        return None
    return tuple(token_ids[:min_tokens])
