"""Clients that keep scoring known pairs, each call checked, while something happens to the servers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from rmserve.config import LoadOptions
from rmserve.models.base import reward_values
from rmserve.models.dense import DenseRewardModel
from rmserve.models.inputs import PromptResponse
from rmserve_client import AsyncRewardClient

PAIRS = [(f"Question {i}: what is {i} times three?", f"It is {3 * i}. " * (1 + i % 5)) for i in range(40)]


def expected_rewards(model_dir: Path) -> list[float]:
    """Each pair's reward, computed in this process."""
    model = DenseRewardModel("m", model_dir, LoadOptions(dtype="float32", device="cpu"))
    encoder = model.new_encoder()
    return [reward_values(model, [encoder.encode(PromptResponse(prompt=p, response=r))])[0] for p, r in PAIRS]


async def keep_scoring(
    client: AsyncRewardClient, expected: list[float], stop: asyncio.Event, workers: int = 8
) -> int:
    """``workers`` loops, each scoring four pairs per call and checking the rewards, until ``stop``; the calls
    made. A failed call raises."""
    calls = 0

    async def loop(worker: int) -> None:
        nonlocal calls
        n = worker
        while not stop.is_set():
            chosen = [PAIRS[(n + j) % len(PAIRS)] for j in range(4)]
            result = await client.score([p for p, _ in chosen], [r for _, r in chosen])
            want = [expected[(n + j) % len(PAIRS)] for j in range(4)]
            assert result.rewards == pytest.approx(want, abs=1e-4)
            calls += 1
            n += 4

    await asyncio.gather(*(loop(w) for w in range(workers)))
    return calls
