"""Offline scoring (``rmserve score``): the server's encoder and forward, batched by sorted length."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from tqdm import tqdm

from rmserve.batching.planning import plan_offline
from rmserve.config import Settings
from rmserve.models.base import RewardModel
from rmserve.models.inputs import INPUT_ADAPTER, RewardInput
from rmserve.serving import resolve_limits


@dataclass(frozen=True)
class OfflineResult:
    reward: float
    truncated: bool
    input_tokens: int


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
    """Score inputs with a loaded model: encode all, sort by length, run token-budget batches."""
    limits, max_length, truncation = resolve_limits(settings, None, model.info)
    encoded = model.new_encoder(max_length).encode_many(inputs, truncation)
    rewards: list[float] = [0.0] * len(encoded)
    batches = plan_offline([len(e) for e in encoded], limits)
    with tqdm(total=sum(map(len, encoded)), unit="tok", disable=not progress, desc="scoring") as bar:
        for batch in batches:
            for index, reward in zip(batch, model.score([encoded[i] for i in batch]), strict=True):
                rewards[index] = reward
            bar.update(sum(len(encoded[i]) for i in batch))
    return [OfflineResult(r, e.truncated, len(e)) for r, e in zip(rewards, encoded, strict=True)]
