"""Loads a model folder as the backend of its kind."""

from __future__ import annotations

from pathlib import Path

from rmserve.models.base import DTypeName, RewardModel
from rmserve.models.dense import DenseRewardModel

KINDS = ("dense",)


def load_model(
    name: str, path: Path, *, kind: str, dtype: DTypeName, device: str, max_length: int | None
) -> RewardModel:
    """Load ``path`` as a model of ``kind``.

    Raises:
        ValueError: the kind is unknown or the folder does not hold such a model.
    """
    if kind == "dense":
        return DenseRewardModel(name, path, dtype=dtype, device=device, max_length=max_length)
    raise ValueError(f"unknown model kind {kind!r}; known kinds: {', '.join(KINDS)}.")
