"""The contract every model backend fulfils, and the device/dtype choices they share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from rmserve.models.inputs import EncodedInput, InputEncoder

DTypeName = Literal["auto", "float32", "bfloat16"]


@dataclass(frozen=True)
class ModelInfo:
    """What ``/v1/models`` says about a loaded model."""

    name: str
    kind: str
    architecture: str
    dtype: str
    device: str
    max_length: int
    parameters: int
    path: str


class ForwardError(RuntimeError):
    """A forward pass failed or produced unusable numbers; fails only its own batch."""


class RewardModel(Protocol):
    """A loaded reward model: encoders for the tokenisation threads, and a batched forward.

    ``score`` runs on the model's device thread; ``new_encoder`` is called once per tokenisation
    thread, because tokenizers are not thread-safe.
    """

    info: ModelInfo

    def new_encoder(self, max_length: int | None = None) -> InputEncoder:
        """A fresh encoder bound to this model's tokenizer, limited to ``max_length`` tokens if given."""
        ...

    def score(self, batch: Sequence[EncodedInput]) -> list[float]:
        """Rewards for a batch, in batch order (raw logits, float); any exception fails the batch."""
        ...


def resolve_device(device: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU.

    Raises:
        ValueError: a CUDA device was asked for on a machine without one.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available; use --device cpu.")
    return dev


def resolve_dtype(dtype: DTypeName, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on a GPU that supports it and float32 elsewhere.

    On CPU float32 is the fast choice: bfloat16 transformer forwards measured several times slower
    than float32 on the reference machine, and float16 is never used on CPU.
    """
    if dtype == "float32":
        return torch.float32
    if dtype == "bfloat16":
        return torch.bfloat16
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    raise ValueError(f"unknown dtype {dtype!r}; use auto, float32 or bfloat16.")
