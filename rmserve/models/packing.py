"""Packed forwards: a batch of decoder inputs run as one sequence, each input attending only to itself.

A right-padded batch computes ``rows x longest`` tokens; on a CPU every padding token costs as much as a
real one. Packed, the batch is one row of all its tokens, with position ids restarting at 0 for each
input and no attention mask: transformers reads the restarts as packed sequences and masks attention
to each input's own tokens (block-diagonal and causal), so each token's state equals the input's
forward alone. The price is attention over the whole packed row (``T x T`` pairs, the mask
materialised), against the padded batch's ``rows x longest x longest`` (causal, unmasked): ``Packing``
cuts a batch into rows short enough that attention stays cheap, and packs only when that costs less
than padding.

Only architectures whose packed forward is held to the padded one by the parity tests
(``tests/models/test_packing.py``) pack (``PACKED_MODEL_TYPES``); others always run padded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rmserve.models.compile import decoder_hidden_states
from rmserve.models.inputs import EncodedInput
from rmserve.models.parallel import RowThreads
from rmserve.models.pooling import PoolingRule
from rmserve.models.prefix import scored_positions
from rmserve.names import CPU_JOIN_PADDING, CPU_PACKED_TOKENS

PACKED_MODEL_TYPES = frozenset({"llama", "qwen2", "gpt_neox"})
"""``config.model_type`` of the architectures that pack (those the parity tests cover)."""


@dataclass(frozen=True)
class Packing:
    """When and how a decoder batch runs packed.

    Costs are counted in tokens of one layer's per-token work (projections and MLP). A packed row of T
    tokens costs ``T + pair_cost x T^2`` (masked attention: every pair computed); each forward costs
    ``fixed_tokens`` besides (reading every weight, launching every layer). Attention grows with the
    square of the row, so rows aim at about ``sqrt(fixed_tokens / pair_cost)`` tokens, where one more
    forward costs what a longer row would, and a batch packs into the cheapest of a few in-order cuts
    (``rows``); the right-padded batch costs
    ``rows x longest + pair_cost x rows x longest^2 / 2`` (causal, unmasked).

    Attributes:
        max_tokens: the most tokens in one packed row.
        pair_cost: one layer's attention cost for one (query, key) pair.
        fixed_tokens: one forward's fixed cost.
    """

    max_tokens: int
    pair_cost: float
    fixed_tokens: int = CPU_JOIN_PADDING

    @property
    def row_tokens(self) -> int:
        """The tokens a packed row aims at (at most ``max_tokens``)."""
        if self.pair_cost <= 0:
            return self.max_tokens
        return max(1, min(self.max_tokens, round(math.sqrt(self.fixed_tokens / self.pair_cost))))

    def rows(self, lengths: Sequence[int]) -> list[list[int]] | None:
        """The packed rows (indices into ``lengths``, in order) when packing costs less than padding, else
        None.

        Candidates: inputs joining a row in order while it stays within ``row_tokens``, and, for each row
        count from the fewest ``max_tokens`` allows to about ``total / row_tokens`` more, the inputs cut in
        order into that many rows of about equal tokens (a 318-token batch runs as one row, not as a row
        of ``row_tokens`` and a short one that costs a whole forward). The cheapest candidate wins; an
        input longer than ``row_tokens`` may be a row of its own, and no row of several inputs holds
        more than ``max_tokens``."""
        if len(lengths) < 2:
            return None
        total = sum(lengths)
        fewest = max(1, math.ceil(total / self.max_tokens))
        most = min(len(lengths), fewest + math.ceil(total / self.row_tokens) + 1)
        candidates = [self._greedy(lengths)] + [
            even_rows(lengths, count) for count in range(fewest, most + 1)
        ]
        fitting = [
            rows
            for rows in candidates
            if all(len(row) == 1 or sum(lengths[i] for i in row) <= self.max_tokens for row in rows)
        ]
        best = min(fitting, key=lambda rows: self._cost(lengths, rows))  # the greedy rows always fit
        width = max(lengths)
        padded = len(lengths) * width + self.pair_cost * len(lengths) * width * width / 2
        return best if self._cost(lengths, best) < padded else None

    def _greedy(self, lengths: Sequence[int]) -> list[list[int]]:
        """Inputs joining a row in order while it stays within ``row_tokens``."""
        rows: list[list[int]] = []
        size = 0
        for i, n in enumerate(lengths):
            if rows and size + n <= self.row_tokens:
                rows[-1].append(i)
                size += n
            else:
                rows.append([i])
                size = n
        return rows

    def _cost(self, lengths: Sequence[int], rows: Sequence[Sequence[int]]) -> float:
        """Packed rows' cost: one fixed cost per extra forward, the tokens, every pair of each row (a row
        of one input: causal, half of them)."""
        cost = float(self.fixed_tokens * (len(rows) - 1))
        for row in rows:
            tokens = sum(lengths[i] for i in row)
            cost += tokens + self.pair_cost * tokens * tokens / (1 if len(row) > 1 else 2)
        return cost


def even_rows(lengths: Sequence[int], count: int) -> list[list[int]]:
    """Inputs cut in order into at most ``count`` rows of about equal tokens: each input goes to the row
    its middle token falls in."""
    share = sum(lengths) / count
    rows: list[list[int]] = [[] for _ in range(count)]
    before = 0
    for i, n in enumerate(lengths):
        rows[min(count - 1, int((before + n / 2) // share))].append(i)
        before += n
    return [row for row in rows if row]


def packing_for(config: Any, max_tokens: int | None, device: torch.device) -> Packing | None:
    """The packing rule of a decoder's config (transformers) on ``device``, or None (always padded).

    Args:
        config: the decoder's config; architectures outside ``PACKED_MODEL_TYPES`` never pack.
        max_tokens: the most tokens in one packed row; 0: never pack; None: by device,
            ``CPU_PACKED_TOKENS`` on a CPU (padding costs as much as real tokens there) and 0 elsewhere
            (a GPU computes padding almost for free, and unmasked attention faster).
        device: where the forward runs.
    """
    if max_tokens is None:
        max_tokens = CPU_PACKED_TOKENS if device.type == "cpu" else 0
    if max_tokens <= 0 or getattr(config, "model_type", None) not in PACKED_MODEL_TYPES:
        return None
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    intermediate = int(config.intermediate_size)
    gated = config.model_type != "gpt_neox"  # llama and qwen2 MLPs: gate, up and down
    projections = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
    per_token = 2 * (projections + (3 if gated else 2) * hidden * intermediate)  # multiply-adds, x2
    per_pair = 4 * heads * head_dim  # q.k and the weighted sum of v, x2
    return Packing(max_tokens=max_tokens, pair_cost=per_pair / per_token)


def packed_states(
    base: nn.Module,
    batch: Sequence[EncodedInput],
    rows: Sequence[Sequence[int]],
    *,
    pooling: PoolingRule,
    pad_id: int,
    device: torch.device,
    compiled: nn.Module | None = None,
    threads: RowThreads | None = None,
) -> torch.Tensor:
    """Each input's final hidden state at its scored token (pooling rule on its own ids), (B, H), from one
    forward of ``base`` (a transformers decoder base model) per packed row (``Packing.rows``), through
    ``compiled`` (its compiled forward, ``rmserve.models.compile``) when given; with ``threads``
    (``rmserve.models.parallel``), the rows dealt round-robin to its threads and run side by side."""
    scored = scored_positions(batch, pooling, pad_id)

    def run_rows(part: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        states = []
        for row in part:
            lengths = [len(batch[i]) for i in row]
            ids = torch.tensor([[t for i in row for t in batch[i].token_ids]], device=device)  # (1, T)
            positions = torch.cat([torch.arange(n) for n in lengths])[None, :].to(device)  # (1, T)
            hidden = decoder_hidden_states(base, compiled, ids, positions)  # (1, T, H)
            starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)  # (R,)
            picked = starts + torch.tensor([scored[i] for i in row])  # (R,)
            states.append(hidden[0, picked.to(device)])  # (R, H)
        return states

    parts = (
        [rows] if threads is None else [p for k in range(threads.count) if (p := rows[k :: threads.count])]
    )
    done = [run_rows(parts[0])] if threads is None else threads.map(run_rows, parts)
    out = torch.cat([s for states in done for s in states])  # (B, H) in the parts' row order
    order = [i for part in parts for row in part for i in row]
    return out[torch.tensor(order, device=device).argsort()]  # (B, H) in batch order
