"""Running a prefix plan on a decoder: each shared prefix once, each suffix against its cached keys and values.

``rmserve.batching.prefix`` decides which rows share which prefix; this module computes them. A group's
prefix runs once (batch of one) into a transformers ``DynamicCache``; its layers are then frozen into
``SharedPrefixLayer``s, which hand every suffix forward the prefix's keys and values, broadcast over the
suffix batch and never grown, so one prefix serves every suffix batch of its group (and, for a branched
model, every branch). Positions continue from the prefix (transformers reads the cache's length), and the
causal mask spans prefix plus suffix, so each suffix token attends exactly as in the full forward.

A row's scored token (its pooling rule, applied to the full ids) may lie inside the prefix (the ``hf``
rule reads the last non-pad token, which for some chat templates is early); its state is then the
prefix's own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from rmserve.batching.prefix import PrefixPlan
from rmserve.models.inputs import EncodedInput
from rmserve.models.pooling import PoolingRule

Run = Callable[[torch.Tensor, Cache | None], torch.Tensor]
"""A decoder forward: token ids (B, T) and an optional cache (filled or read) -> final hidden states (B, T, H)."""


class SharedPrefixLayer(DynamicLayer):
    """One layer's cached prefix keys and values, (1, heads, P, d), read by every suffix batch, never grown."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.device = keys.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix's keys and values followed by the suffix batch's, (B, heads, P + T, d); stores nothing."""
        assert self.keys is not None and self.values is not None
        rows = key_states.shape[0]
        keys = torch.cat([self.keys.expand(rows, -1, -1, -1), key_states], dim=-2)
        values = torch.cat([self.values.expand(rows, -1, -1, -1), value_states], dim=-2)
        return keys, values


def frozen_layers(cache: Cache) -> list[DynamicLayer]:
    """A filled cache's layers as ``SharedPrefixLayer``s (layers it never filled stay empty)."""
    layers: list[DynamicLayer] = []
    for layer in cache.layers:
        if (
            isinstance(layer, DynamicLayer)
            and layer.is_initialized
            and layer.keys is not None
            and layer.values is not None
        ):
            layers.append(SharedPrefixLayer(layer.keys, layer.values))
        elif isinstance(layer, DynamicLayer) and not layer.is_initialized:
            layers.append(DynamicLayer())
        else:
            raise TypeError(
                f"prefix sharing needs plain key/value cache layers; this model's cache holds {type(layer).__name__}. "
                "Serve it with --prefix-min-tokens 0."
            )
    return layers


def shared_cache(layers: Sequence[DynamicLayer]) -> Cache:
    """A cache over frozen prefix layers, for suffix forwards."""
    return Cache(layers=list(layers))


def new_cache() -> DynamicCache:
    """An empty cache for a prefix forward to fill."""
    return DynamicCache()


def padded_rows(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """Token ids right-padded with ``pad_id``, (B, T)."""
    ids = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r))
    return ids.to(device)


def scored_positions(batch: Sequence[EncodedInput], pooling: PoolingRule, pad_id: int) -> list[int]:
    """Each input's scored position under its pooling rule, read on its full ids."""
    ids = padded_rows([x.token_ids for x in batch], pad_id, torch.device("cpu"))  # (B, T)
    lengths = torch.tensor([len(x) for x in batch])  # (B,)
    return pooling.positions(ids, lengths).tolist()


def planned_states(
    run: Run,
    batch: Sequence[EncodedInput],
    plan: PrefixPlan,
    *,
    pooling: PoolingRule,
    pad_id: int,
    device: torch.device,
) -> torch.Tensor:
    """Each input's final hidden state at its scored token, computed as ``plan`` says, (B, H), on the device.

    Args:
        run: the decoder forward (``Run``).
        batch: the inputs.
        plan: the rows' prefix groups and the rows that run whole.
        pooling: the scored-token rule.
        pad_id: the id padding is written with (never attended to nor scored).
        device: where the forward runs.
    """
    positions = scored_positions(batch, pooling, pad_id)
    pooled: list[torch.Tensor | None] = [None] * len(batch)
    if plan.rest:
        ids = padded_rows([batch[r].token_ids for r in plan.rest], pad_id, device)  # (R, T)
        hidden = run(ids, None)  # (R, T, H)
        for i, row in enumerate(plan.rest):
            pooled[row] = hidden[i, positions[row]]
    for group in plan.groups:
        prefix_ids = torch.tensor([batch[group.rows[0]].token_ids[: group.prefix]], device=device)  # (1, P)
        cache = new_cache()
        prefix_hidden = run(prefix_ids, cache)  # (1, P, H)
        shared = frozen_layers(cache)
        for rows in group.suffix_batches:
            suffixes = [batch[r].token_ids[group.prefix :] for r in rows]
            hidden = run(padded_rows(suffixes, pad_id, device), shared_cache(shared))  # (S, T, H)
            for i, row in enumerate(rows):
                at = positions[row]
                pooled[row] = prefix_hidden[0, at] if at < group.prefix else hidden[i, at - group.prefix]
    missing = [row for row, state in enumerate(pooled) if state is None]
    if missing:
        raise ValueError(f"the prefix plan leaves rows {missing} of {len(batch)} uncomputed.")
    return torch.stack([state for state in pooled if state is not None])  # (B, H)


def base_run(base: torch.nn.Module) -> Run:
    """``Run`` for a transformers decoder base model."""

    def run(ids: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        return base(input_ids=ids, cache=cache, use_cache=cache is not None).last_hidden_state

    return run
