"""Reward functions for TRL's trainers (GRPO, RLOO, ...), backed by a client.

TRL calls a reward function as ``f(prompts=..., completions=..., completion_ids=..., **columns)``
and logs it under ``f.__name__``; it awaits the function when it is a coroutine function. Two
formats reach it:

- standard: prompts and completions are strings -> each ``prompt + completion`` as text tokenized without
  special tokens (``client.score_texts(..., add_special_tokens=False)``), exactly the text and tokens
  GRPOTrainer gives a reward model of its own;
- conversational: prompts are message lists and completions are message lists (usually one
  assistant turn) -> each prompt's messages followed by its completion's messages ->
  ``client.score_messages`` (the server applies the reward model's chat template, as GRPOTrainer does).
  A string on either side of a conversational pair is taken as a user (prompt) or assistant
  (completion) turn.

Extra keyword arguments (``completion_ids``, dataset columns, ``trainer_state``, ...) are ignored.

A failure (the server unreachable or refusing, after the client's retries) raises by default, which stops
the training step. With ``on_error="none"`` the function logs it and returns ``None`` for each row
instead: TRL turns ``None`` into NaN, leaves the row out of its group's mean and standard deviation (and
of the sum over reward functions), and gives a row that no function scored an advantage of 0.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rmserve_client._async_client import AsyncRewardClient
from rmserve_client._client import RewardClient
from rmserve_client._errors import RewardClientError
from rmserve_client._models import ScoreResult

RewardFunc = Callable[..., list[float | None]]
AsyncRewardFunc = Callable[..., Awaitable[list[float | None]]]
OnError = Literal["raise", "none"]
ON_ERROR = ("raise", "none")

log = logging.getLogger("rmserve_client")


@dataclass(frozen=True)
class _Request:
    """One reward call as client arguments: plain texts, or conversations when ``conversations`` is set."""

    texts: list[str]
    conversations: list[list[Mapping[str, Any]]] | None


@dataclass(frozen=True)
class _Adapter:
    """What the sync and async reward functions share: request building and result picking."""

    aggregate: str | None
    options: dict[str, Any]

    def request(self, prompts: Sequence[Any], completions: Sequence[Any]) -> _Request:
        """``prompt + completion`` texts when every prompt and completion is a string, else conversations.

        Raises:
            ValueError: prompts and completions differ in length.
            TypeError: a prompt or completion is neither a string nor a list of messages.
        """
        if len(prompts) != len(completions):
            raise ValueError(
                f"got {len(prompts)} prompts and {len(completions)} completions; TRL passes one prompt "
                "per completion."
            )
        if all(isinstance(x, str) for x in (*prompts, *completions)):
            return _Request([p + c for p, c in zip(prompts, completions, strict=True)], None)
        conversations = [
            [*_turns(p, "user", f"prompts[{i}]"), *_turns(c, "assistant", f"completions[{i}]")]
            for i, (p, c) in enumerate(zip(prompts, completions, strict=True))
        ]
        return _Request([], conversations)

    def rewards(self, result: ScoreResult) -> list[float]:
        """``rewards``, or the chosen aggregate."""
        if self.aggregate is None:
            return result.rewards
        return result.aggregates[self.aggregate]


def _adapter(
    model: str | None,
    aggregate: str | None,
    uwo_lambda: float | None,
    tradeoff_lambda: float | None,
    truncation: str | None,
) -> _Adapter:
    options: dict[str, Any] = {
        "model": model,
        "uwo_lambda": uwo_lambda,
        "tradeoff_lambda": tradeoff_lambda,
        "truncation": truncation,
    }
    if aggregate is not None:
        options["aggregates"] = [aggregate]
    return _Adapter(aggregate, options)


def _turns(value: Any, role: str, where: str) -> list[Mapping[str, Any]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, Sequence):
        return list(value)
    raise TypeError(f"{where} must be a string or a list of messages, got {type(value).__name__}.")


def _check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be 'raise' or 'none', got {on_error!r}.")


def _failed(exc: RewardClientError, rows: int, on_error: str) -> list[float | None]:
    """Raise ``exc``, or (``on_error="none"``) log it and give every row ``None``."""
    if on_error == "raise":
        raise exc
    log.warning("rmserve reward failed for %d rows, returned None (TRL leaves them out): %s", rows, exc)
    return [None] * rows


def _name(name: str | None, model: str | None, aggregate: str | None) -> str:
    if name is not None:
        return name
    parts = ["rmserve", model, aggregate]
    return re.sub(r"\W+", "_", "_".join(p for p in parts if p))


def as_reward_func(
    client: RewardClient,
    *,
    model: str | None = None,
    aggregate: str | None = None,
    uwo_lambda: float | None = None,
    tradeoff_lambda: float | None = None,
    truncation: str | None = None,
    name: str | None = None,
    on_error: OnError = "raise",
) -> RewardFunc:
    """A TRL reward function ``(prompts, completions, **kwargs) -> list[float]`` that scores with ``client``.

    Args:
        client: the client that scores (chunking, concurrency and retries are its own).
        model: the model to use (default: the client's, else the server's default).
        aggregate: return this aggregate over the model's heads (e.g. ``uwo``, ``min``) instead of
            ``rewards``.
        uwo_lambda: UWO's lambda (default: the model's).
        tradeoff_lambda: the trade-off aggregate's lambda (default: the model's).
        truncation: ``left``, ``right`` or ``error`` (default: the model's policy).
        name: the function's ``__name__``, under which TRL logs it (default:
            ``rmserve[_<model>][_<aggregate>]``).
        on_error: ``raise`` (default): a failed call raises ``RewardClientError``; ``none``: it is logged
            and every row of the call gets ``None`` (TRL then leaves those rows out; module docstring).

    Raises:
        ValueError: ``on_error`` is neither ``raise`` nor ``none``.

    Example::

        client = RewardClient("http://127.0.0.1:8000")
        trainer = GRPOTrainer(..., reward_funcs=[as_reward_func(client, aggregate="uwo")])
    """
    adapter = _adapter(model, aggregate, uwo_lambda, tradeoff_lambda, truncation)
    _check_on_error(on_error)

    def reward_func(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        request = adapter.request(prompts, completions)
        try:
            if request.conversations is None:
                result = client.score_texts(request.texts, add_special_tokens=False, **adapter.options)
            else:
                result = client.score_messages(request.conversations, **adapter.options)
        except RewardClientError as exc:
            return _failed(exc, len(prompts), on_error)
        return list(adapter.rewards(result))

    reward_func.__name__ = reward_func.__qualname__ = _name(name, model, aggregate)
    return reward_func


def as_async_reward_func(
    client: AsyncRewardClient,
    *,
    model: str | None = None,
    aggregate: str | None = None,
    uwo_lambda: float | None = None,
    tradeoff_lambda: float | None = None,
    truncation: str | None = None,
    name: str | None = None,
    on_error: OnError = "raise",
) -> AsyncRewardFunc:
    """An async TRL reward function scoring with ``client``; arguments as for ``as_reward_func``.

    TRL runs async reward functions concurrently with each other on its own event loop; create the
    client anywhere, and let only that loop use it.
    """
    adapter = _adapter(model, aggregate, uwo_lambda, tradeoff_lambda, truncation)
    _check_on_error(on_error)

    async def reward_func(
        prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
    ) -> list[float | None]:
        request = adapter.request(prompts, completions)
        try:
            if request.conversations is None:
                result = await client.score_texts(request.texts, add_special_tokens=False, **adapter.options)
            else:
                result = await client.score_messages(request.conversations, **adapter.options)
        except RewardClientError as exc:
            return _failed(exc, len(prompts), on_error)
        return list(adapter.rewards(result))

    reward_func.__name__ = reward_func.__qualname__ = _name(name, model, aggregate)
    return reward_func
