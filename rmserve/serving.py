"""The served models: loading them from settings, and turning a score request into batched work.

Per model: one tokenisation thread (tokenizers are not thread-safe) and one batcher; per device:
one forward thread shared by every model on it, so forwards on a device never overlap.
Flow: inputs -> encode (tokenisation thread) -> batcher queue -> forward (device thread) -> rewards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rmserve.batching.batcher import Batcher, BatchObserver
from rmserve.batching.planning import UNLIMITED, BatchLimits
from rmserve.config import CPU_JOIN_PADDING, DEMO, ModelSpec, Settings
from rmserve.models.base import ForwardError, ModelInfo, RewardModel
from rmserve.models.inputs import EncodedInput, InputEncoder, RewardInput, Truncation
from rmserve.models.loader import load_model

log = logging.getLogger(__name__)


class UnknownModel(LookupError):
    """A request named a model this server does not serve."""


@dataclass(frozen=True)
class ScoreOutcome:
    """The result of scoring one request's inputs, in input order."""

    model: str
    rewards: list[float]
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
    ) -> None:
        if max_length > limits.max_batch_tokens:
            raise ValueError(
                f"model {model.info.name!r}: max_length={max_length} exceeds max_batch_tokens="
                f"{limits.max_batch_tokens}, so a long input could never fit a batch; raise max_batch_tokens "
                "or lower max_length."
            )
        self.model = model
        self.encoder: InputEncoder = model.new_encoder(max_length)
        self.info: ModelInfo = dataclasses.replace(model.info, max_length=self.encoder.max_length)
        self.truncation = truncation
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix=f"tokenize-{model.info.name}")
        self.batcher: Batcher[EncodedInput, float] = Batcher(
            self._forward,
            executor=device_executor,
            limits=limits,
            max_wait_s=max_wait_s,
            max_queue_tokens=max_queue_tokens,
            observer=observer,
            name=model.info.name,
        )

    def _forward(self, batch: list[EncodedInput]) -> list[float]:
        """The model's forward, with its output checked (runs on the device thread).

        Raises:
            ForwardError: a reward is NaN or infinite.
        """
        rewards = self.model.score(batch)
        bad = sum(1 for r in rewards if not math.isfinite(r))
        if bad:
            raise ForwardError(
                f"the model produced a non-finite reward for {bad} of {len(batch)} inputs in this batch; "
                "check the checkpoint's weights, or use --dtype float32 if it runs in bfloat16."
            )
        return rewards

    @property
    def name(self) -> str:
        return self.info.name

    def start(self) -> None:
        self.batcher.start()

    async def close(self, timeout_s: float) -> None:
        await self.batcher.close(timeout_s)
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    async def score(
        self, inputs: Sequence[RewardInput], truncation: Truncation | None = None
    ) -> ScoreOutcome:
        """Score inputs through the batcher.

        Raises:
            InputError: an input cannot be encoded (422).
            BatcherError: the queue refused the work or its batch failed.
        """
        start = time.monotonic()
        loop = asyncio.get_running_loop()
        encoded = await loop.run_in_executor(
            self._tokenizer_thread, self.encoder.encode_many, list(inputs), truncation or self.truncation
        )
        tokenized = time.monotonic()
        results = await self.batcher.submit([(e, len(e)) for e in encoded])
        inference = {r.batch_id: r.inference_s for r in results}
        return ScoreOutcome(
            model=self.name,
            rewards=[r.value for r in results],
            truncated=[e.truncated for e in encoded],
            input_tokens=sum(len(e) for e in encoded),
            tokenize_s=tokenized - start,
            queue_s=max((r.queue_s for r in results), default=0.0),
            inference_s=sum(inference.values()),
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
    if spec.path == DEMO:
        from rmserve.demo import build_demo_model

        return build_demo_model(cache_dir)
    return Path(spec.path).expanduser()


class ModelRegistry:
    """The models a server serves, by name; the first is the default."""

    def __init__(
        self, models: Sequence[ServedModel], device_executors: dict[str, ThreadPoolExecutor]
    ) -> None:
        if not models:
            raise ValueError("no models to serve; pass --model or list models in the config.")
        self.models = {m.name: m for m in models}
        self.default = models[0].name
        self._device_executors = device_executors

    def get(self, name: str | None) -> ServedModel:
        """The model called ``name`` (the default when ``None``).

        Raises:
            UnknownModel: no served model has that name.
        """
        if name is None:
            return self.models[self.default]
        try:
            return self.models[name]
        except KeyError:
            raise UnknownModel(
                f"model {name!r} is not served here; served models: {', '.join(self.models)} (GET /v1/models)."
            ) from None

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
            device = model.info.device
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
                )
            )
        return cls(served, executors)


def load_models(settings: Settings) -> tuple[list[RewardModel], list[ModelSpec]]:
    """Load every model the settings name (blocking: call it from a worker thread)."""
    specs = settings.served_models()
    models = []
    for spec in specs:
        path = resolve_model_path(spec, settings.cache_dir)
        started = time.monotonic()
        log.info("loading model %r from %s", spec.name, path)
        model = load_model(
            spec.name,
            path,
            kind=spec.kind,
            dtype=spec.dtype or settings.dtype,
            device=spec.device or settings.device,
            max_length=spec.max_length or settings.max_length,
        )
        info = model.info
        log.info(
            "loaded %r: %s, %s on %s, %.1fM parameters, in %.1fs",
            spec.name,
            info.architecture,
            info.dtype,
            info.device,
            info.parameters / 1e6,
            time.monotonic() - started,
        )
        models.append(model)
    return models, specs
