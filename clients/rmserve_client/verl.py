"""verl's custom reward function, backed by an rmserve server.

verl's reward loop has no setting for an outside reward server; its supported route is a custom reward
function, which it calls once per rollout, by keyword, and awaits when it is a coroutine function::

    await compute_score(data_source=..., solution_str=..., ground_truth=..., extra_info=..., **reward_kwargs)

``compute_score`` here is that function (``reward.custom_reward_function.path: pkg://rmserve_client.verl``,
``name: compute_score``); ``compute_score_sync`` is the blocking one, for verl's legacy batch reward
manager and its ``remote`` manager, which call it without awaiting. Both return
``{"score": reward, **extras}``; verl keeps every key as a ``reward_extra_info`` column, so every call
returns the same keys (for one configuration and model).

What is scored: ``solution_str`` (the response, as verl decodes it) after the prompt, which verl does not
pass: the dataset puts it in ``extra_info`` under ``prompt_key`` (default ``prompt``), as a string (one user
turn) or a list of chat messages. The server applies the reward model's chat template, as verl's own
reward-model path does.

Settings (``VerlSettings``), each from, in order: the call's keyword arguments (verl's
``custom_reward_function.reward_kwargs``), ``extra_info["rmserve"]`` (a dict, per row), then the
environment (``RMSERVE_URL``, ``RMSERVE_MODEL``, ``RMSERVE_REWARD``, ``RMSERVE_AGGREGATES``,
``RMSERVE_HEADS``, ``RMSERVE_API_KEY``, ``RMSERVE_PROMPT_KEY``, ``RMSERVE_TIMEOUT``, ``RMSERVE_RUN``).

Extras: ``rm_reward`` (the server's reward), ``rm_<aggregate>`` for each of ``aggregates``, and with
``heads``: ``rm_head_<name>`` per head and, for brme models, ``rm_sigma_<name>``.

Rule-based rewards combine through ``make_compute_score(rule=..., combine=...)``: ``rule`` is called like
``compute_score`` (verl's ``default_compute_score`` fits) and returns a number or a dict with ``score``;
``combine(rule_score, rm_reward)`` (default: their sum) gives ``score``; ``rule_score`` joins the extras.
"""

from __future__ import annotations

import asyncio
import atexit
import inspect
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from rmserve_client._async_client import AsyncRewardClient
from rmserve_client._client import RewardClient
from rmserve_client._models import ModelInfo, ScoreResult

ENVIRONMENT = {
    "url": "RMSERVE_URL",
    "model": "RMSERVE_MODEL",
    "reward": "RMSERVE_REWARD",
    "aggregates": "RMSERVE_AGGREGATES",
    "heads": "RMSERVE_HEADS",
    "api_key": "RMSERVE_API_KEY",
    "prompt_key": "RMSERVE_PROMPT_KEY",
    "timeout": "RMSERVE_TIMEOUT",
    "run": "RMSERVE_RUN",
}
VERL_KWARGS = ("reward_router_address", "reward_model_tokenizer")  # verl's own, when it runs a reward model
Rule = Callable[..., Any]
Combine = Callable[[float, float], float]


@dataclass(frozen=True)
class VerlSettings:
    """Where and how to score.

    Attributes:
        url: the server (several, comma-separated: replicas the client spreads calls over).
        model: the model (default: the server's default).
        reward: the aggregate that is the reward (default: the model's ``rewards``).
        aggregates: more aggregates returned as extras.
        heads: also return each head's reward (and sigma, for brme models) as extras.
        api_key: the server's API key.
        prompt_key: the ``extra_info`` key holding the prompt.
        timeout: seconds a call may take (the client retries within it).
        run: the training run's name (sent to the server's run monitor as ``x-rmserve-run``).
    """

    url: str
    model: str | None = None
    reward: str | None = None
    aggregates: tuple[str, ...] = ()
    heads: bool = False
    api_key: str | None = None
    prompt_key: str = "prompt"
    timeout: float = 180.0
    run: str | None = None

    @classmethod
    def resolve(
        cls, kwargs: Mapping[str, Any], extra_info: Mapping[str, Any] | None, environ: Mapping[str, str]
    ) -> VerlSettings:
        """The settings of one call (see the module docstring for the order).

        Raises:
            ValueError: no URL anywhere, an unknown setting, or a value of the wrong kind.
        """
        row = (extra_info or {}).get("rmserve") or {}
        if not isinstance(row, Mapping):
            raise ValueError(f"extra_info['rmserve'] must be a dict of settings, got {type(row).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known - set(VERL_KWARGS)) + sorted(set(row) - known)
        if unknown:
            raise ValueError(
                f"unknown rmserve settings {', '.join(unknown)}; the settings are {', '.join(sorted(known))}."
            )
        values: dict[str, Any] = {}
        for name in known:
            if name in kwargs:
                values[name] = kwargs[name]
            elif name in row:
                values[name] = row[name]
            elif ENVIRONMENT[name] in environ:
                values[name] = environ[ENVIRONMENT[name]]
        if not values.get("url"):
            raise ValueError(
                "no rmserve URL: set RMSERVE_URL in the reward workers' environment, or "
                "+reward.custom_reward_function.reward_kwargs.url=http://host:8000 in verl's config."
            )
        aggregates = values.get("aggregates", ())
        if isinstance(aggregates, str):
            aggregates = [a.strip() for a in aggregates.split(",") if a.strip()]
        values["aggregates"] = tuple(aggregates)
        heads = values.get("heads", False)
        if isinstance(heads, str):
            if heads.strip().lower() not in ("1", "0", "true", "false", "yes", "no", ""):
                raise ValueError(f"heads must be true or false, got {heads!r}.")
            heads = heads.strip().lower() in ("1", "true", "yes")
        values["heads"] = bool(heads)
        try:
            values["timeout"] = float(values.get("timeout", 180.0))
        except (TypeError, ValueError):
            raise ValueError(f"timeout must be a number of seconds, got {values['timeout']!r}.") from None
        return cls(**values)

    @property
    def urls(self) -> list[str]:
        return [u.strip() for u in self.url.split(",") if u.strip()]

    @property
    def client_key(self) -> tuple[Any, ...]:
        """What one cached client serves: the server, the key and the timeout."""
        return (self.url, self.api_key, self.timeout, self.run)


def _prompt(extra_info: Mapping[str, Any] | None, key: str) -> str | list[Mapping[str, Any]]:
    value = (extra_info or {}).get(key)
    if isinstance(value, str) and value:
        return value
    if isinstance(value, Sequence) and value and all(isinstance(m, Mapping) for m in value):
        return list(value)
    raise ValueError(
        f"extra_info[{key!r}] holds no prompt (got {type(value).__name__}); rmserve scores the prompt with "
        f"the response, and verl passes only the response: put the prompt (a string, or the chat messages) in "
        f"each row's extra_info[{key!r}] when preparing the data, or name its key with prompt_key."
    )


def _options(settings: VerlSettings) -> dict[str, Any]:
    aggregates = list(dict.fromkeys([*([settings.reward] if settings.reward else []), *settings.aggregates]))
    return {"model": settings.model, "aggregates": aggregates or None, "return_heads": settings.heads}


def _result(settings: VerlSettings, result: ScoreResult, info: ModelInfo | None) -> dict[str, Any]:
    """``{"score": reward, **extras}`` of one scored rollout."""
    reward = result.rewards[0] if settings.reward is None else result.aggregates[settings.reward][0]
    out: dict[str, Any] = {"score": reward, "rm_reward": reward}
    for name in settings.aggregates:
        out[f"rm_{name}"] = result.aggregates[name][0]
    if settings.heads and result.heads is not None:
        names = info.heads if info is not None and len(info.heads) == len(result.heads[0]) else None
        labels = names or [str(i) for i in range(len(result.heads[0]))]
        for label, value in zip(labels, result.heads[0], strict=True):
            out[f"rm_head_{label}"] = value
        for label, value in zip(labels, (result.head_std or [[]])[0], strict=False):
            out[f"rm_sigma_{label}"] = value
    return out


def _model_info(models: Sequence[ModelInfo], name: str | None) -> ModelInfo | None:
    return next((m for m in models if (m.id == name if name else m.default)), None)


def _conversation(prompt: str | list[Mapping[str, Any]], response: str) -> list[Mapping[str, Any]]:
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return [*turns, {"role": "assistant", "content": response}]


_async_clients: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop,
    dict[tuple[Any, ...], tuple[AsyncRewardClient, dict[str | None, ModelInfo | None]]],
] = weakref.WeakKeyDictionary()
_sync_clients: dict[tuple[Any, ...], tuple[RewardClient, dict[str | None, ModelInfo | None]]] = {}
_sync_lock = threading.Lock()


def close_clients() -> None:
    """Close the blocking clients ``compute_score_sync`` opened (also run at interpreter exit)."""
    with _sync_lock:
        clients = [client for client, _ in _sync_clients.values()]
        _sync_clients.clear()
    for client in clients:
        client.close()


async def aclose_clients() -> None:
    """Close the clients ``compute_score`` opened on the running event loop (call it before the loop ends,
    as verl's workers never need to: they keep one loop for the whole run)."""
    per_loop = _async_clients.pop(asyncio.get_running_loop(), {})
    for client, _ in per_loop.values():
        await client.aclose()


atexit.register(close_clients)


def _async_client(settings: VerlSettings) -> tuple[AsyncRewardClient, dict[str | None, ModelInfo | None]]:
    """One client per event loop and server (verl's reward workers each run one loop)."""
    loop = asyncio.get_running_loop()
    per_loop = _async_clients.setdefault(loop, {})
    if settings.client_key not in per_loop:
        client = AsyncRewardClient(
            settings.urls, api_key=settings.api_key, timeout=settings.timeout, run=settings.run
        )
        per_loop[settings.client_key] = (client, {})
    return per_loop[settings.client_key]


def _sync_client(settings: VerlSettings) -> tuple[RewardClient, dict[str | None, ModelInfo | None]]:
    with _sync_lock:
        if settings.client_key not in _sync_clients:
            client = RewardClient(
                settings.urls, api_key=settings.api_key, timeout=settings.timeout, run=settings.run
            )
            _sync_clients[settings.client_key] = (client, {})
        return _sync_clients[settings.client_key]


def _request(
    solution_str: str, extra_info: Mapping[str, Any] | None, kwargs: Mapping[str, Any]
) -> tuple[VerlSettings, list[Mapping[str, Any]]]:
    """One call's settings and the conversation it scores."""
    settings = VerlSettings.resolve(kwargs, extra_info, os.environ)
    return settings, _conversation(_prompt(extra_info, settings.prompt_key), solution_str)


async def _score_async(
    solution_str: str, extra_info: Mapping[str, Any] | None, kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    settings, conversation = _request(solution_str, extra_info, kwargs)
    client, infos = _async_client(settings)
    if settings.heads and settings.model not in infos:
        infos[settings.model] = _model_info(await client.models(), settings.model)
    result = await client.score_messages([conversation], **_options(settings))
    return _result(settings, result, infos.get(settings.model))


def compute_score_sync(
    data_source: Any = None,
    solution_str: str = "",
    ground_truth: Any = None,
    extra_info: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """``compute_score`` for callers that do not await (verl's legacy batch and ``remote`` managers)."""
    settings, conversation = _request(solution_str, extra_info, kwargs)
    client, infos = _sync_client(settings)
    if settings.heads and settings.model not in infos:
        infos[settings.model] = _model_info(client.models(), settings.model)
    result = client.score_messages([conversation], **_options(settings))
    return _result(settings, result, infos.get(settings.model))


def _rule_score(value: Any) -> tuple[float, dict[str, Any]]:
    if isinstance(value, Mapping):
        if "score" not in value:
            raise ValueError("the rule returned a dict without 'score'; return a number or {'score': ...}.")
        extras = {f"rule_{k}": v for k, v in value.items() if k != "score"}
        return float(value["score"]), extras
    return float(value), {}


def make_compute_score(
    *, rule: Rule | None = None, combine: Combine | None = None
) -> Callable[..., Awaitable[dict[str, Any]]]:
    """An async ``compute_score`` adding a rule-based score to the rmserve reward.

    Args:
        rule: called with verl's keyword arguments (``data_source``, ``solution_str``, ``ground_truth``,
            ``extra_info``); returns a number or a dict with ``score`` (its other keys join the extras as
            ``rule_<key>``). A coroutine function is awaited; a plain one runs in a worker thread.
        combine: ``(rule_score, rm_reward) -> score`` (default: their sum).

    Example (a file verl loads with ``custom_reward_function.path``)::

        from rmserve_client.verl import make_compute_score
        from verl.utils.reward_score import default_compute_score

        compute_score = make_compute_score(rule=default_compute_score, combine=lambda rule, rm: rule + 0.1 * rm)
    """
    join = combine or (lambda rule_score, reward: rule_score + reward)

    async def compute_score(
        data_source: Any = None,
        solution_str: str = "",
        ground_truth: Any = None,
        extra_info: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        scored = await _score_async(solution_str, extra_info, kwargs)
        if rule is None:
            return scored
        call = {"data_source": data_source, "solution_str": solution_str, "ground_truth": ground_truth,
                "extra_info": extra_info}  # fmt: skip
        if inspect.iscoroutinefunction(rule):
            value = await rule(**call)
        else:
            value = await asyncio.to_thread(rule, **call)
        rule_score, extras = _rule_score(value)
        return {**scored, "score": join(rule_score, scored["rm_reward"]), "rule_score": rule_score, **extras}

    return compute_score


compute_score = make_compute_score()
compute_score.__doc__ = """verl's custom reward function (async): the rmserve reward of ``solution_str`` after the prompt
in ``extra_info``, with extras (module docstring).

Raises:
    ValueError: no URL, an unknown setting, or no prompt in ``extra_info``.
    RewardClientError: the server could not score (after the client's retries).
"""
