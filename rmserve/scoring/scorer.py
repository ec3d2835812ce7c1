"""One served model: its tokenisation thread and batcher, turning a score request into batched work.

Flow: inputs -> encode (the model's tokenisation thread, as tokenizers are not thread-safe; a few token
ids are checked on the event loop instead) -> batcher
queue -> forward (the device's one forward thread, shared by every model on the device) -> head
rewards and aggregates. Each queued input carries its request's lambdas, so one batch may serve
requests with different lambdas; the model's ``reward`` is the aggregate configured for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from rmserve.aggregation import AggregationParams, request_aggregates
from rmserve.batching.batcher import Batcher, BatchObserver
from rmserve.batching.device import DeviceExecutor
from rmserve.batching.planning import BatchLimits
from rmserve.batching.prefix import plan_prefixes, prefix_key
from rmserve.models.base import Encoded, Encoder, ForwardError, ModelInfo, RewardModel
from rmserve.models.inputs import EncodedInput, InputError, RewardInput, TokenIds
from rmserve.names import AGGREGATES, COMBINED, AggregateName, RewardName, TradeoffScope, Truncation
from rmserve.scoring.duplicates import DuplicateCache, input_digest


class ScoringObserver(BatchObserver, Protocol):
    """Receives what a served model measures besides its batches (implemented by the metrics module)."""

    def prefix_reused(self, tokens: int) -> None:
        """A forward computed ``tokens`` fewer tokens by sharing prefixes."""
        ...

    def duplicates_looked_up(self, *, lookups: int, hits: int) -> None:
        """``lookups`` inputs were looked up in the duplicate cache, ``hits`` of them found."""
        ...


@dataclass(frozen=True, slots=True)
class QueuedInput:
    """One encoded input in the batcher's queue, with its request's lambdas."""

    encoded: Encoded
    params: AggregationParams


@dataclass(frozen=True, slots=True)
class InputScores:
    """One input's outputs: head rewards, sigmas (brme), every aggregate (``AGGREGATES`` order), and for
    dmoerm its combined reward and routed category."""

    heads: list[float]
    head_std: list[float] | None
    aggregates: list[float]
    combined: float | None = None
    route: int | None = None


@dataclass(frozen=True)
class ScoreOutcome:
    """The result of scoring one request's inputs, in input order.

    ``rewards`` is the model's reward (an aggregate, or dmoerm's combined reward); ``aggregates`` holds the
    requested ones; ``heads`` and ``head_std`` are ``None`` unless requested (``head_std`` only for brme
    models), as is ``categories`` (each input's routed category, dmoerm models only).
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
    categories: list[str] | None = None
    input_lengths: list[int] | None = None  # each input's tokens (``input_tokens`` is their sum)
    head_values: list[list[float]] | None = None  # every input's heads, asked for or not (the run monitor)
    head_sigmas: list[list[float]] | None = None  # brme models: every input's sigmas, asked for or not


INLINE_ENCODE_IDS = 4096
"""Requests of token ids alone, this many in all or fewer, are encoded on the event loop: encoding token ids
never touches the tokenizer (``Encoder``), and checking a few thousand ids takes well under a millisecond."""


def _inline(items: Sequence[RewardInput]) -> bool:
    total = 0
    for item in items:
        if not isinstance(item, TokenIds):
            return False
        total += len(item.input_ids)
    return total <= INLINE_ENCODE_IDS


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
        reward: what ``rewards`` returns (default: the model's own choice); ``combined`` only for
            models that compute one (dmoerm).
        defaults: lambdas for requests that set none (default: the model's own).
        prefix_min_tokens: the shortest shared prefix computed once for several inputs (0: never share);
            only for models that share prefixes (``ModelInfo.shares_prefixes``).
        duplicate_cache_entries: scored inputs kept to answer exact repeats without a forward
            (``rmserve.scoring.duplicates``; 0: no cache).
        autocast: run the forward under ``torch.autocast`` in bfloat16 (matmuls in bfloat16, float32
            weights kept; the heads stay float32); only for float32 models.

    Raises:
        ValueError: ``max_length`` cannot fit a batch, or ``combined`` was asked of a model without one.
    """

    def __init__(
        self,
        model: RewardModel,
        *,
        max_length: int,
        truncation: Truncation,
        limits: BatchLimits,
        device_executor: DeviceExecutor,
        max_wait_s: float,
        max_queue_tokens: int,
        observer: ScoringObserver | None = None,
        reward: RewardName | None = None,
        defaults: AggregationParams | None = None,
        prefix_min_tokens: int = 0,
        duplicate_cache_entries: int = 0,
        autocast: bool = False,
    ) -> None:
        if reward == COMBINED and not model.info.has_combined:
            raise ValueError(
                f"model {model.info.name!r} is a {model.info.kind} model, whose rewards are aggregates of its heads; "
                "reward: combined is a dmoerm model's own reward. Choose one of "
                + ", ".join(AGGREGATES)
                + "."
            )
        if autocast and model.info.dtype != "float32":
            raise ValueError(
                f"model {model.info.name!r}: autocast runs a float32 model's matmuls in bfloat16, but its weights "
                f"are {model.info.dtype}; serve it with --dtype float32, or without --autocast."
            )
        if max_length > limits.max_batch_tokens:
            raise ValueError(
                f"model {model.info.name!r}: max_length={max_length} exceeds max_batch_tokens="
                f"{limits.max_batch_tokens}, so a long input could never fit a batch; raise max_batch_tokens "
                "or lower max_length."
            )
        self.model = model
        self.autocast = autocast
        self.encoder: Encoder = model.new_encoder(max_length)
        self.info: ModelInfo = dataclasses.replace(
            model.info,
            dtype="float32 (bfloat16 autocast)" if autocast else model.info.dtype,
            max_length=self.encoder.max_length,
            reward=reward or model.info.reward,
            defaults=defaults or model.info.defaults,
        )
        self.truncation = truncation
        self.limits = limits
        self.prefix_min_tokens = prefix_min_tokens if model.info.shares_prefixes else 0
        self._observer = observer
        self._duplicates: DuplicateCache[InputScores] | None = (
            DuplicateCache(duplicate_cache_entries) if duplicate_cache_entries else None
        )
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix=f"tokenize-{model.info.name}")
        self.batcher: Batcher[QueuedInput, InputScores] = Batcher(
            self._forward,
            executor=device_executor,
            limits=limits,
            max_wait_s=max_wait_s,
            max_queue_tokens=max_queue_tokens,
            observer=observer,
            name=model.info.name,
            device_idle=device_executor.idle,
        )

    def _forward(self, batch: list[QueuedInput]) -> list[InputScores]:
        """The model's forward, with its output checked (runs on the device thread); inputs that share a
        prefix compute it once.

        Raises:
            ForwardError: a head reward, sigma or aggregate is NaN or infinite.
        """
        plan = None
        if self.prefix_min_tokens:
            ids = [item.encoded.token_ids for item in batch if isinstance(item.encoded, EncodedInput)]
            if len(ids) == len(batch):
                plan = plan_prefixes(ids, self.prefix_min_tokens, self.limits)
                plan = plan if plan.groups else None
        device = self.model.info.device.split(":")[0]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model.score(
                [item.encoded for item in batch],
                plan=plan,
                uwo_lambda=torch.tensor([item.params.uwo_lambda for item in batch], dtype=torch.float32),
                tradeoff_lambda=torch.tensor(
                    [item.params.tradeoff_lambda for item in batch], dtype=torch.float32
                ),
            )
        if self.model.info.has_combined and out.combined is None:
            raise ForwardError(
                f"the {self.model.info.kind} model returned no combined reward for this batch."
            )
        tensors = [out.heads, out.aggregates] + ([] if out.head_std is None else [out.head_std])
        tensors += [] if out.combined is None else [out.combined[:, None]]
        finite = torch.stack([t.isfinite().all(dim=-1) for t in tensors]).all(dim=0)  # (B,)
        bad = int((~finite).sum())
        if bad:
            raise ForwardError(
                f"the model produced a non-finite reward for {bad} of {len(batch)} inputs in this batch; "
                "check the checkpoint's weights, or use --dtype float32 if it runs in bfloat16."
            )
        if plan is not None and self._observer is not None:
            self._observer.prefix_reused(plan.reused_tokens)
        heads = out.heads.tolist()
        aggregates = out.aggregates.tolist()
        stds = out.head_std.tolist() if out.head_std is not None else [None] * len(batch)
        combined = out.combined.tolist() if out.combined is not None else [None] * len(batch)
        routes = out.routes.tolist() if out.routes is not None else [None] * len(batch)
        rows = zip(heads, stds, aggregates, combined, routes, strict=True)
        return [InputScores(h, s, a, c, r) for h, s, a, c, r in rows]

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def special_texts(self) -> tuple[str | None, str | None]:
        """The pad and EOS tokens' texts, for protocols that send padded texts (None for ensembles)."""
        tokenizer = getattr(self.encoder, "tokenizer", None)
        pad, eos = (getattr(tokenizer, name, None) for name in ("pad_token", "eos_token"))
        return (pad if isinstance(pad, str) and pad else None, eos if isinstance(eos, str) and eos else None)

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
        tradeoff_scope: TradeoffScope = "input",
        sample_seed: int | None = None,
        wait_for_room: bool = False,
    ) -> ScoreOutcome:
        """Score inputs through the batcher.

        Args:
            inputs: the inputs, in order.
            truncation: over-long inputs' policy (default: the model's).
            params: the lambdas (default: the model's).
            aggregates: the aggregates to return besides ``rewards``.
            return_heads: also return each head's reward (and sigma for brme).
            max_tokens: a tighter per-input token limit for this request (truncation applies past it).
            tradeoff_scope: the trade-off's worst case per ``input`` or per ``request``
                (``rmserve.aggregation.request_aggregates``).
            sample_seed: brme models: score samples ``mu + a * sigma`` drawn with this seed.
            wait_for_room: when the model's queue is full, wait for room (until cancelled) instead of
                failing with ``Overloaded`` (the trainers' routes: their clients do not retry 429).

        Raises:
            InputError: an input cannot be encoded, or sampling asked of a model without sigmas (422).
            BatcherError: the queue refused the work or its batch failed.
        """
        if sample_seed is not None and not self.info.has_std:
            raise InputError(
                f"brme_sample draws mu + a * sigma from each head, but {self.name!r} is a {self.info.kind} model "
                "without sigmas; drop brme_sample or ask a brme model."
            )
        params = params or self.info.defaults
        start = time.monotonic()
        items = list(inputs)
        if _inline(items):  # token ids only, few: checking them costs less than a thread hop
            encoded = self.encoder.encode_many(items, truncation or self.truncation, max_tokens)
        else:
            encoded = await asyncio.get_running_loop().run_in_executor(
                self._tokenizer_thread,
                self.encoder.encode_many,
                items,
                truncation or self.truncation,
                max_tokens,
            )
        tokenized = time.monotonic()
        groups = None
        if self.prefix_min_tokens:
            keys = [
                prefix_key(e.token_ids, self.prefix_min_tokens) if isinstance(e, EncodedInput) else None
                for e in encoded
            ]
            groups = [None if key is None else (key, self.prefix_min_tokens) for key in keys]
        digests = [input_digest(e, params) for e in encoded] if self._duplicates is not None else []
        known: dict[bytes, InputScores] = {}
        if self._duplicates is not None:
            for digest in digests:
                hit = self._duplicates.get(digest) if digest is not None else None
                if digest is not None and hit is not None:
                    known[digest] = hit
            if self._observer is not None:
                hits = sum(d is not None and d in known for d in digests)
                self._observer.duplicates_looked_up(lookups=len(digests), hits=hits)
        # each input not known is computed once, however often it repeats in the request
        todo: dict[bytes | int, int] = {}
        for i in range(len(encoded)):
            digest = digests[i] if digests else None
            if digest is None or digest not in known:
                todo.setdefault(i if digest is None else digest, i)
        rows = list(todo.values())
        results = await self.batcher.submit(
            [(QueuedInput(encoded[i], params), len(encoded[i])) for i in rows],
            wait=wait_for_room,
            groups=None if groups is None else [groups[i] for i in rows],
        )
        computed = dict(zip(rows, results, strict=True))
        if self._duplicates is not None:
            for i, result in computed.items():
                digest = digests[i]
                if digest is not None:
                    self._duplicates.put(digest, result.value)
                    known[digest] = result.value
        scores: list[InputScores] = []
        for i in range(len(encoded)):
            if i in computed:
                scores.append(computed[i].value)
                continue
            digest = digests[i]  # not computed: known before, or a repeat of an input computed above
            assert digest is not None
            scores.append(known[digest])
        inference = {r.batch_id: r.inference_s for r in results}
        heads = [s.heads for s in scores]
        table = [s.aggregates for s in scores]
        if tradeoff_scope == "request" or sample_seed is not None:
            stds = torch.tensor([s.head_std for s in scores]) if self.info.has_std else None
            used, recomputed = request_aggregates(
                torch.tensor(heads),
                torch.tensor(table),
                params,
                scope=tradeoff_scope,
                head_std=stds,
                sample_seed=sample_seed,
            )
            heads, table = used.tolist(), recomputed.tolist()
        if self.info.reward == COMBINED:
            rewards = [s.combined for s in scores if s.combined is not None]  # _forward checked each is there
        else:
            rewards = [row[AGGREGATES.index(self.info.reward)] for row in table]
        head_std = None
        if return_heads and self.info.has_std:
            head_std = [s.head_std or [] for s in scores]
        categories = None
        if return_heads and self.info.categories:
            categories = [self.info.categories[s.route or 0] for s in scores]
        return ScoreOutcome(
            model=self.name,
            rewards=rewards,
            aggregates={a: [row[AGGREGATES.index(a)] for row in table] for a in aggregates},
            heads=heads if return_heads else None,
            head_std=head_std,
            truncated=[e.truncated for e in encoded],
            input_tokens=sum(len(e) for e in encoded),
            tokenize_s=tokenized - start,
            queue_s=max((r.queue_s for r in results), default=0.0),  # 0: every input was a known duplicate
            inference_s=sum(inference.values()),
            categories=categories,
            input_lengths=[len(e) for e in encoded],
            head_values=heads,
            head_sigmas=[s.head_std or [] for s in scores] if self.info.has_std else None,
        )
