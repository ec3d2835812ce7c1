"""Offline scoring (``rmserve score``): the server's encoder and forward, batched by sorted length.

As in the server, inputs that begin with the same tokens (best-of-n candidates for one prompt) compute
that prefix once (``rmserve.batching.prefix``), for models that share prefixes, unless
``prefix_min_tokens`` is 0: the inputs are sorted by token ids, each window of ``PREFIX_WINDOW`` of them
is planned, and each prefix group runs as one call; the other inputs are batched by sorted length.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from tqdm import tqdm

from rmserve.batching.planning import BatchLimits, plan_offline
from rmserve.batching.prefix import PrefixGroup, PrefixPlan, plan_prefixes
from rmserve.config import Settings
from rmserve.models.base import RewardModel, lambdas_for, reward_column
from rmserve.models.inputs import INPUT_ADAPTER, EncodedInput, RewardInput
from rmserve.names import AGGREGATES
from rmserve.scoring.registry import resolve_limits

PREFIX_WINDOW = 256  # inputs planned together (neighbours in token-id order)


@dataclass(frozen=True)
class OfflineResult:
    """One input's scores: the model's reward, every aggregate, the heads (and sigmas; dmoerm: the category)."""

    reward: float
    aggregates: dict[str, float]
    heads: list[float]
    head_std: list[float] | None
    truncated: bool
    input_tokens: int
    category: str | None = None


def read_inputs(path: Path) -> tuple[list[RewardInput], list[object]]:
    """Parse a JSONL file of inputs; an optional ``id`` key per line is carried to the output.

    Raises:
        ValueError: a line is not valid JSON or not one of the input forms (the message names it).
    """
    inputs: list[RewardInput] = []
    ids: list[object] = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                row_id = row.pop("id", None) if isinstance(row, dict) else None
                inputs.append(INPUT_ADAPTER.validate_python(row))
            except (json.JSONDecodeError, ValidationError) as exc:
                raise ValueError(f"{path}:{number}: not a valid input ({exc})") from None
            ids.append(row_id)
    return inputs, ids


def score_model(
    model: RewardModel, inputs: Sequence[RewardInput], settings: Settings, *, progress: bool = False
) -> list[OfflineResult]:
    """Score inputs with a loaded model: encode all, sort by length, run token-budget batches.

    Aggregates use the model's default lambdas; ``reward`` is the model's reward aggregate.
    """
    limits, max_length, truncation = resolve_limits(settings, None, model.info)
    encoded = model.new_encoder(max_length).encode_many(inputs, truncation)
    results: list[OfflineResult | None] = [None] * len(encoded)
    work: list[tuple[list[int], PrefixPlan | None]] = []
    rest = list(range(len(encoded)))
    if settings.prefix_min_tokens and model.info.shares_prefixes:
        work, rest = prefix_work(encoded, settings.prefix_min_tokens, limits)
    work += [
        ([rest[i] for i in batch], None) for batch in plan_offline([len(encoded[i]) for i in rest], limits)
    ]
    with tqdm(total=sum(map(len, encoded)), unit="tok", disable=not progress, desc="scoring") as bar:
        for batch, plan in work:
            lambdas = lambdas_for(model.info.defaults, len(batch))
            out = model.score([encoded[i] for i in batch], **lambdas, plan=plan)
            stds = out.head_std.tolist() if out.head_std is not None else [None] * len(batch)
            routes = out.routes.tolist() if out.routes is not None else [None] * len(batch)
            rewards = reward_column(out, model.info.reward).tolist()
            rows = zip(batch, rewards, out.heads.tolist(), stds, out.aggregates.tolist(), routes, strict=True)
            for index, reward, heads, std, aggregates, route in rows:
                results[index] = OfflineResult(
                    reward=reward,
                    aggregates=dict(zip(AGGREGATES, aggregates, strict=True)),
                    heads=heads,
                    head_std=std,
                    truncated=encoded[index].truncated,
                    input_tokens=len(encoded[index]),
                    category=None if route is None else model.info.categories[route],
                )
            bar.update(sum(len(encoded[i]) for i in batch))
    return [r for r in results if r is not None]


def prefix_work(
    encoded: Sequence[object], min_tokens: int, limits: BatchLimits
) -> tuple[list[tuple[list[int], PrefixPlan | None]], list[int]]:
    """The prefix groups among ``encoded`` (each a batch with its one-group plan), and the inputs in none."""
    ids = [e.token_ids if isinstance(e, EncodedInput) else () for e in encoded]
    order = sorted(range(len(ids)), key=lambda i: (ids[i], i))
    work: list[tuple[list[int], PrefixPlan | None]] = []
    rest: list[int] = []
    for start in range(0, len(order), PREFIX_WINDOW):
        window = order[start : start + PREFIX_WINDOW]
        plan = plan_prefixes([ids[i] for i in window], min_tokens, limits)
        rest += [window[r] for r in plan.rest]
        for group in plan.groups:
            local = {row: k for k, row in enumerate(group.rows)}  # window row -> row of the group's batch
            suffixes = tuple(tuple(local[r] for r in batch) for batch in group.suffix_batches)
            one = PrefixGroup(tuple(range(len(group.rows))), group.prefix, suffixes)
            work.append(([window[r] for r in group.rows], PrefixPlan((one,), ())))
    return work, sorted(rest)
