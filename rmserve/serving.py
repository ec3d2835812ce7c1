"""The served models: loading them from settings, and turning a score request into batched work.

Per model: one tokenisation thread (tokenizers are not thread-safe) and one batcher; per device:
one forward thread shared by every model on it, so forwards on a device never overlap.
Flow: inputs -> encode (tokenisation thread) -> batcher queue -> forward (device thread) -> head
rewards and aggregates. Each queued input carries its request's lambdas, so one batch may serve
requests with different lambdas; the model's ``reward`` is the aggregate configured for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from rmserve.aggregation import AGGREGATES, AggregateName, AggregationParams
from rmserve.batching.batcher import Batcher, BatchObserver
from rmserve.batching.planning import UNLIMITED, BatchLimits
from rmserve.config import CPU_JOIN_PADDING, DEMO_MODELS, ModelSpec, Settings
from rmserve.memory import MemoryPlan, device_key, plan_served_models
from rmserve.models.base import Encoded, Encoder, ForwardError, ModelInfo, RewardModel, lambdas_for
from rmserve.models.inputs import RewardInput, Text, Truncation
from rmserve.models.loader import load_model

log = logging.getLogger(__name__)


class UnknownModel(LookupError):
    """A request named a model this server does not serve."""


@dataclass(frozen=True, slots=True)
class QueuedInput:
    """One encoded input in the batcher's queue, with its request's lambdas."""

    encoded: Encoded
    params: AggregationParams


@dataclass(frozen=True, slots=True)
class InputScores:
    """One input's outputs: head rewards, sigmas (brme) and every aggregate (``AGGREGATES`` order)."""

    heads: list[float]
    head_std: list[float] | None
    aggregates: list[float]


@dataclass(frozen=True)
class ScoreOutcome:
    """The result of scoring one request's inputs, in input order.

    ``rewards`` is the model's reward aggregate; ``aggregates`` holds the requested ones; ``heads`` and
    ``head_std`` are ``None`` unless requested (``head_std`` only for brme models).
    """

    model: str
    rewards: list[float]
    aggregates: dict[str, list[float]]
    heads: list[list[float]] | None
    head_std: list[list[float]] | None
    truncated: list[bool]
    input_tokens: int
    tokenize_s: float
    queue_s: float
    inference_s: float


class ServedModel:
    """A loaded model with its encoder thread and batcher.

    Args:
        model: the loaded backend.
        max_length: token limit per input (at most the model's own).
        truncation: default truncation policy for requests that do not set one.
        limits: per-batch caps.
        device_executor: the forward thread of the model's device.
        max_wait_s: batch window.
        max_queue_tokens: queue bound.
        observer: receives batch and queue measurements.
        reward: the aggregate returned as ``rewards`` (default: the model's own choice).
        defaults: lambdas for requests that set none (default: the model's own).
    """

    def __init__(
        self,
        model: RewardModel,
        *,
        max_length: int,
        truncation: Truncation,
        limits: BatchLimits,
        device_executor: ThreadPoolExecutor,
        max_wait_s: float,
        max_queue_tokens: int,
        observer: BatchObserver | None = None,
        reward: AggregateName | None = None,
        defaults: AggregationParams | None = None,
    ) -> None:
        if max_length > limits.max_batch_tokens:
            raise ValueError(
                f"model {model.info.name!r}: max_length={max_length} exceeds max_batch_tokens="
                f"{limits.max_batch_tokens}, so a long input could never fit a batch; raise max_batch_tokens "
                "or lower max_length."
            )
        self.model = model
        self.encoder: Encoder = model.new_encoder(max_length)
        self.info: ModelInfo = dataclasses.replace(
            model.info,
            max_length=self.encoder.max_length,
            reward=reward or model.info.reward,
            defaults=defaults or model.info.defaults,
        )
        self.truncation = truncation
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix=f"tokenize-{model.info.name}")
        self.batcher: Batcher[QueuedInput, InputScores] = Batcher(
            self._forward,
            executor=device_executor,
            limits=limits,
            max_wait_s=max_wait_s,
            max_queue_tokens=max_queue_tokens,
            observer=observer,
            name=model.info.name,
        )

    def _forward(self, batch: list[QueuedInput]) -> list[InputScores]:
        """The model's forward, with its output checked (runs on the device thread).

        Raises:
            ForwardError: a head reward, sigma or aggregate is NaN or infinite.
        """
        out = self.model.score(
            [item.encoded for item in batch],
            uwo_lambda=torch.tensor([item.params.uwo_lambda for item in batch], dtype=torch.float32),
            tradeoff_lambda=torch.tensor(
                [item.params.tradeoff_lambda for item in batch], dtype=torch.float32
            ),
        )
        tensors = [out.heads, out.aggregates] + ([] if out.head_std is None else [out.head_std])
        finite = torch.stack([t.isfinite().all(dim=-1) for t in tensors]).all(dim=0)  # (B,)
        bad = int((~finite).sum())
        if bad:
            raise ForwardError(
                f"the model produced a non-finite reward for {bad} of {len(batch)} inputs in this batch; "
                "check the checkpoint's weights, or use --dtype float32 if it runs in bfloat16."
            )
        heads = out.heads.tolist()
        aggregates = out.aggregates.tolist()
        stds = out.head_std.tolist() if out.head_std is not None else [None] * len(batch)
        return [InputScores(h, s, a) for h, s, a in zip(heads, stds, aggregates, strict=True)]

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def special_texts(self) -> tuple[str | None, str | None]:
        """The pad and EOS tokens' texts, for protocols that send padded texts (None for ensembles)."""
        tokenizer = getattr(self.encoder, "tokenizer", None)
        texts = (getattr(tokenizer, "pad_token", None), getattr(tokenizer, "eos_token", None))
        return tuple(t if isinstance(t, str) and t else None for t in texts)  # type: ignore[return-value]

    def start(self) -> None:
        self.batcher.start()

    async def close(self, timeout_s: float) -> None:
        await self.batcher.close(timeout_s)
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    async def score(
        self,
        inputs: Sequence[RewardInput],
        truncation: Truncation | None = None,
        *,
        params: AggregationParams | None = None,
        aggregates: Sequence[AggregateName] = (),
        return_heads: bool = False,
        max_tokens: int | None = None,
    ) -> ScoreOutcome:
        """Score inputs through the batcher.

        Args:
            inputs: the inputs, in order.
            truncation: over-long inputs' policy (default: the model's).
            params: the lambdas (default: the model's).
            aggregates: the aggregates to return besides ``rewards``.
            return_heads: also return each head's reward (and sigma for brme).
            max_tokens: a tighter per-input token limit for this request (truncation applies past it).

        Raises:
            InputError: an input cannot be encoded (422).
            BatcherError: the queue refused the work or its batch failed.
        """
        params = params or self.info.defaults
        start = time.monotonic()
        loop = asyncio.get_running_loop()
        encoded = await loop.run_in_executor(
            self._tokenizer_thread,
            self.encoder.encode_many,
            list(inputs),
            truncation or self.truncation,
            max_tokens,
        )
        tokenized = time.monotonic()
        results = await self.batcher.submit([(QueuedInput(e, params), len(e)) for e in encoded])
        inference = {r.batch_id: r.inference_s for r in results}
        scores = [r.value for r in results]
        reward_column = AGGREGATES.index(self.info.reward)
        head_std = None
        if return_heads and self.info.has_std:
            head_std = [s.head_std or [] for s in scores]
        return ScoreOutcome(
            model=self.name,
            rewards=[s.aggregates[reward_column] for s in scores],
            aggregates={a: [s.aggregates[AGGREGATES.index(a)] for s in scores] for a in aggregates},
            heads=[s.heads for s in scores] if return_heads else None,
            head_std=head_std,
            truncated=[e.truncated for e in encoded],
            input_tokens=sum(len(e) for e in encoded),
            tokenize_s=tokenized - start,
            queue_s=max((r.queue_s for r in results), default=0.0),
            inference_s=sum(inference.values()),
        )


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


def resolve_model_path(spec: ModelSpec, cache_dir: Path) -> Path:
    """The folder to load for a spec; ``demo`` is built into ``cache_dir`` on first use."""
    if spec.path in DEMO_MODELS:
        from rmserve.demo import build_demo

        return build_demo(spec.path, cache_dir)
    return Path(spec.path).expanduser()


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

    def __init__(
        self, models: Sequence[ServedModel], device_executors: dict[str, ThreadPoolExecutor]
    ) -> None:
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
        observer_for: Callable[[str], BatchObserver] | None = None,
    ) -> ModelRegistry:
        """Wrap loaded models with their batchers, using ``settings`` (and per-model specs) for limits."""
        executors: dict[str, ThreadPoolExecutor] = {}
        served = []
        for i, model in enumerate(models):
            spec = specs[i] if specs is not None else None
            device = device_key(model.info.device)  # cuda and cuda:0 share one thread, as memory plans
            if device not in executors:
                executors[device] = ThreadPoolExecutor(1, thread_name_prefix=f"forward-{device}")
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
                )
            )
        return cls(served, executors)


@dataclass(frozen=True)
class LoadPlan:
    """What ``load_models`` loads: each served model's spec and folder, and their memory plan."""

    specs: list[ModelSpec]
    paths: list[Path]
    memory: MemoryPlan


def plan_loading(settings: Settings) -> LoadPlan:
    """Find every model's folder (building demos), plan their memory and log it, before loading any.

    Raises:
        MemoryBudgetError: the models do not fit a device's budget (the message lists every estimate).
        ValueError: a folder cannot be estimated or a budget determined.
    """
    specs = settings.served_models()
    paths = [resolve_model_path(spec, settings.cache_dir) for spec in specs]
    memory = plan_served_models(settings, specs, paths)
    memory.log()
    memory.check()
    return LoadPlan(specs, paths, memory)


def load_models(
    settings: Settings, plan: LoadPlan | None = None
) -> tuple[list[RewardModel], list[ModelSpec]]:
    """Load every model the settings name (blocking: call it from a worker thread).

    Args:
        settings: the server settings.
        plan: ``plan_loading(settings)`` if already made; made here otherwise, so a configuration over
            its memory budget is refused before any model is loaded.
    """
    plan = plan or plan_loading(settings)
    specs = plan.specs
    models = []
    for spec, path in zip(plan.specs, plan.paths, strict=True):
        started = time.monotonic()
        log.info("loading model %r from %s", spec.name, path)
        model = load_model(spec.name, path, **settings.load_options(spec))
        warm_up(model)
        info = model.info
        log.info(
            "loaded %r: %s, %s on %s, quantize %s, %.1fM parameters, %.1f MiB of weights, in %.1fs",
            spec.name,
            info.architecture,
            info.dtype,
            info.device,
            info.quantize,
            info.parameters / 1e6,
            info.weights_bytes / 2**20,
            time.monotonic() - started,
        )
        estimate = plan.memory.estimate(spec.name).total_bytes
        model.info = dataclasses.replace(model.info, memory_estimate_bytes=estimate)
        models.append(model)
    return models, specs


WARM_UP_TEXT = "rmserve warm-up"


def warm_up(model: RewardModel) -> None:
    """Score one short text on the model's device before the model takes requests.

    The first forward pays the device's one-off costs: the CUDA context and cuBLAS handles and, on the
    Triton path, every kernel's compilation and the autotuning of the smallest batch bucket (larger
    buckets still tune at their first batch, then come from Triton's disk cache). No request waits on
    them. On a CPU it takes about half a second for the demo model. It also checks that the checkpoint
    gives finite rewards.

    Raises:
        ForwardError: a non-finite reward for the warm-up text.
    """
    started = time.monotonic()
    encoded = model.new_encoder().encode_many([Text(text=WARM_UP_TEXT)])
    out = model.score(encoded, **lambdas_for(model.info.defaults, 1))
    rewards = [out.heads, out.aggregates] + ([] if out.head_std is None else [out.head_std])
    if not all(bool(t.isfinite().all()) for t in rewards):
        raise ForwardError(
            f"model {model.info.name!r} gives a non-finite reward for a short text at load; check the "
            "checkpoint's weights, or use --dtype float32 if it runs in bfloat16."
        )
    log.info("warmed %r up in %.2fs", model.info.name, time.monotonic() - started)
