"""The served models by name (and by the folder each was loaded from), with each model's limits.

Per model: one tokenisation thread and one batcher (``ServedModel``); per device: one forward thread
shared by every model on it, so forwards on a device never overlap (and the memory plan counts one
activation peak per device).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence

from rmserve.aggregation import AggregationParams
from rmserve.batching.device import DeviceExecutor
from rmserve.batching.planning import UNLIMITED, BatchLimits
from rmserve.config import ModelSpec, Settings
from rmserve.memory import device_key
from rmserve.models.base import ModelInfo, RewardModel
from rmserve.names import CPU_JOIN_PADDING, Truncation
from rmserve.scoring.scorer import ScoringObserver, ServedModel


class UnknownModel(LookupError):
    """A request named a model this server does not serve."""


def spec_defaults(spec: ModelSpec | None, info: ModelInfo) -> AggregationParams:
    """A model's default lambdas: the config's, else the model folder's."""
    return AggregationParams(
        uwo_lambda=info.defaults.uwo_lambda if spec is None or spec.uwo_lambda is None else spec.uwo_lambda,
        tradeoff_lambda=(
            info.defaults.tradeoff_lambda
            if spec is None or spec.tradeoff_lambda is None
            else spec.tradeoff_lambda
        ),
    )


def resolve_limits(
    settings: Settings, spec: ModelSpec | None, info: ModelInfo
) -> tuple[BatchLimits, int, Truncation]:
    """A model's batch limits, token limit per input and default truncation.

    Per-model values (``spec``) win over server-wide ``settings``; unset, ``max_join_padding`` depends on
    the device (see ``batching.planning``) and ``max_length`` is the model's own limit, capped by
    ``max_batch_tokens``.
    """
    join = spec.max_join_padding if spec and spec.max_join_padding is not None else settings.max_join_padding
    if join is None:
        join = CPU_JOIN_PADDING if info.device.startswith("cpu") else UNLIMITED
    limits = BatchLimits(
        max_batch_tokens=(spec and spec.max_batch_tokens) or settings.max_batch_tokens,
        max_batch_size=(spec and spec.max_batch_size) or settings.max_batch_size,
        max_join_padding=join,
    )
    max_length = (
        (spec and spec.max_length) or settings.max_length or min(info.max_length, limits.max_batch_tokens)
    )
    return limits, max_length, (spec and spec.truncation) or settings.truncation


def folder_aliases(folder: str) -> tuple[str, ...]:
    """The names a model's folder may be given by: its absolute path, and that path with links resolved.

    verl sends its own local model path as ``model``; when that is the folder the model was loaded from,
    the request means this model.
    """
    absolute = os.path.normpath(os.path.abspath(os.path.expanduser(folder)))
    return tuple(dict.fromkeys((absolute, os.path.realpath(absolute))))


class ModelRegistry:
    """The models a server serves, by name (or by the path of the folder each was loaded from); the first
    is the default."""

    def __init__(self, models: Sequence[ServedModel], device_executors: dict[str, DeviceExecutor]) -> None:
        if not models:
            raise ValueError("no models to serve; pass --model or list models in the config.")
        self.models = {m.name: m for m in models}
        self.default = models[0].name
        self._device_executors = device_executors
        self.aliases = {m.name: folder_aliases(m.info.path) for m in models}
        self._by_folder = {alias: m for m in models for alias in self.aliases[m.name]}

    def get(self, name: str | None) -> ServedModel:
        """The model called ``name`` (the default when ``None``); a path names the model loaded from it.

        Raises:
            UnknownModel: no served model has that name or folder.
        """
        if name is None:
            return self.models[self.default]
        served = self.models.get(name)
        if served is None and ("/" in name or os.sep in name):
            served = self._by_folder.get(os.path.normpath(os.path.abspath(os.path.expanduser(name))))
        if served is None:
            raise UnknownModel(
                f"model {name!r} is not served here; served models: {', '.join(self.models)}, or the path of "
                "a served model's folder (GET /v1/models lists each model's aliases)."
            )
        return served

    def start(self) -> None:
        for model in self.models.values():
            model.start()

    async def close(self, timeout_s: float) -> None:
        """Finish accepted work on every model, then release the threads."""
        await asyncio.gather(*(m.close(timeout_s) for m in self.models.values()))
        for executor in self._device_executors.values():
            executor.shutdown(wait=False, cancel_futures=True)

    @classmethod
    def from_models(
        cls,
        models: Sequence[RewardModel],
        settings: Settings,
        *,
        specs: Sequence[ModelSpec] | None = None,
        observer_for: Callable[[str], ScoringObserver] | None = None,
    ) -> ModelRegistry:
        """Wrap loaded models with their batchers, using ``settings`` (and per-model specs) for limits."""
        executors: dict[str, DeviceExecutor] = {}
        served = []
        for i, model in enumerate(models):
            spec = specs[i] if specs is not None else None
            device = device_key(model.info.device)  # cuda and cuda:0 share one thread, as memory plans
            if device not in executors:
                executors[device] = DeviceExecutor(device)
            limits, max_length, truncation = resolve_limits(settings, spec, model.info)
            served.append(
                ServedModel(
                    model,
                    max_length=max_length,
                    truncation=truncation,
                    limits=limits,
                    device_executor=executors[device],
                    max_wait_s=settings.max_wait_ms / 1000,
                    max_queue_tokens=settings.max_queue_tokens,
                    observer=observer_for(model.info.name) if observer_for else None,
                    reward=spec.reward if spec else None,
                    defaults=spec_defaults(spec, model.info),
                    prefix_min_tokens=(
                        spec.prefix_min_tokens
                        if spec and spec.prefix_min_tokens is not None
                        else settings.prefix_min_tokens
                    ),
                    autocast=spec.autocast if spec and spec.autocast is not None else settings.autocast,
                    duplicate_cache_entries=(
                        spec.duplicate_cache_entries
                        if spec and spec.duplicate_cache_entries is not None
                        else settings.duplicate_cache_entries
                    ),
                )
            )
        return cls(served, executors)
