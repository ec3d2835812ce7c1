"""The dynamic batcher: one bounded queue per model, batches cut by a padded-token budget.

Requests put items (one per input) on the queue and await their futures. A single loop task owns
the queue: it waits (event-driven, no polling) until a full batch is waiting, the device is idle (a
batch would run at once: waiting for company would only add latency), or the oldest item has waited
``max_wait_s``, cuts a batch around the oldest item with :func:`grow_batch` (length-aware, so
padding stays low), or, when the oldest item belongs to a prefix group (inputs that begin with the same
tokens: ``rmserve.batching.prefix``) with company waiting, from that group alone, so the model computes
the shared prefix once; and runs it on the model's device executor (one thread per device, so one
forward at a time). While a forward runs, new items queue up and form the next batch.

Guarantees:
- a failing forward fails exactly the items of its batch (``BatchFailed``); the loop keeps serving;
- items whose future is already done (their client hung up) are dropped before they are computed;
- the queue is bounded in tokens: a submit that would overflow it raises ``Overloaded`` with a
  retry-after estimate, or, with ``wait=True`` (the trainers' routes: their clients do not retry 429),
  waits for room, first come first served, until the caller is cancelled; while any submit waits, others
  get no room before it. One larger than the whole queue raises ``RequestTooLarge``;
- ``close`` stops intake, lets every accepted item finish, and fails what is left only on timeout.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from rmserve.batching.planning import BatchLimits, grow_batch

P = TypeVar("P")
R = TypeVar("R")

log = logging.getLogger(__name__)

WINDOW = 1024  # items considered when grouping by length; the oldest is always among them


class BatcherError(Exception):
    """Base class of the batcher's errors."""


class Overloaded(BatcherError):
    """The queue is full; retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTooLarge(BatcherError):
    """The request alone holds more tokens than the whole queue may."""


class Closed(BatcherError):
    """The batcher is shutting down and takes no new work."""


class BatchFailed(BatcherError):
    """The forward of the batch holding this item failed."""


@dataclass(frozen=True, slots=True)
class ItemResult(Generic[R]):
    """One item's value and where its time went."""

    value: R
    queue_s: float
    inference_s: float
    batch_id: int
    batch_size: int


class BatchObserver(Protocol):
    """Receives what the batcher measures (implemented by the metrics module)."""

    def batch_done(
        self,
        *,
        size: int,
        real_tokens: int,
        padded_tokens: int,
        queue_s: Sequence[float],
        inference_s: float,
        ok: bool,
    ) -> None: ...

    def queue_changed(self, *, items: int, tokens: int) -> None: ...

    def waiting_changed(self, requests: int) -> None: ...

    def items_dropped(self, count: int) -> None: ...


class _NoObserver:
    def batch_done(self, **_: object) -> None:
        pass

    def queue_changed(self, **_: object) -> None:
        pass

    def waiting_changed(self, requests: int) -> None:
        pass

    def items_dropped(self, count: int) -> None:
        pass


@dataclass(eq=False, slots=True)
class _Item(Generic[P, R]):
    payload: P
    n_tokens: int
    future: asyncio.Future[ItemResult[R]]
    group: Hashable | None = None  # inputs with the same group begin with the same ``shared`` tokens
    shared: int = 0
    enqueued: float = field(default_factory=time.monotonic)


class Batcher(Generic[P, R]):
    """Collects items from concurrent requests into batches and runs them on one executor.

    Args:
        run_batch: computes a batch, returning one value per payload in order; runs on ``executor``.
        executor: the device's executor (one worker thread: one forward at a time per device).
        limits: per-batch caps (padded tokens, items).
        max_wait_s: how long the oldest item may wait for company before a partial batch runs.
        max_queue_tokens: tokens that may wait in the queue.
        observer: receives batch and queue measurements.
        name: used in log lines and errors.
        device_idle: whether the device has no forward running or waiting; when it has none, a batch
            goes at once instead of waiting ``max_wait_s`` for company (None: always wait).
    """

    def __init__(
        self,
        run_batch: Callable[[list[P]], Sequence[R]],
        *,
        executor: Executor,
        limits: BatchLimits,
        max_wait_s: float,
        max_queue_tokens: int,
        observer: BatchObserver | None = None,
        name: str = "model",
        device_idle: Callable[[], bool] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._device_idle = device_idle
        self._executor = executor
        self.limits = limits
        self.max_wait_s = max_wait_s
        self.max_queue_tokens = max_queue_tokens
        self._observer: BatchObserver = observer or _NoObserver()
        self.name = name
        self._pending: list[_Item[P, R]] = []
        self._queued_tokens = 0
        self._busy = False
        self._closing = False
        self._arrival = asyncio.Event()
        self._progress = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._tokens_per_s = 0.0  # moving average, for Retry-After estimates
        self._batches = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()  # (tokens, room) in arrival order
        self._reserved = 0  # tokens of waiters let in that have not queued their items yet

    @property
    def queued_items(self) -> int:
        return len(self._pending)

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    def start(self) -> None:
        """Start the loop task on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    @property
    def waiting_requests(self) -> int:
        """Submits waiting for room in the queue (``wait=True``)."""
        return len(self._waiters)

    async def submit(
        self,
        items: Sequence[tuple[P, int]],
        *,
        wait: bool = False,
        groups: Sequence[tuple[Hashable, int] | None] | None = None,
    ) -> list[ItemResult[R]]:
        """Queue items (payload, token count) and wait for all of their results, in order.

        If the caller is cancelled (its client hung up, its request timed out), its items still queued are
        dropped, and a wait for room ends.

        Args:
            items: (payload, token count) pairs.
            wait: when the queue is full, wait for room (first come, first served) instead of raising
                ``Overloaded``.
            groups: per item, its prefix group and how many leading tokens the group shares (None: in no
                group); items of one group are batched together.

        Raises:
            Closed: the batcher is shutting down (also ending a wait for room).
            RequestTooLarge: the items hold more tokens than the queue may ever hold.
            Overloaded: the queue has no room for the items now, and ``wait`` is false.
            BatchFailed: the forward of a batch holding one of the items failed.
        """
        if self._closing:
            raise Closed(
                f"model {self.name!r} is shutting down and takes no new requests; retry on another replica."
            )
        if not items:
            return []
        total = sum(n for _, n in items)
        if total > self.max_queue_tokens:
            raise RequestTooLarge(
                f"the request holds {total} tokens but model {self.name!r} queues at most {self.max_queue_tokens}; "
                "split it into smaller requests."
            )
        if self._waiters or self._queued_tokens + self._reserved + total > self.max_queue_tokens:
            if not wait:
                raise Overloaded(
                    f"model {self.name!r} is overloaded ({self._queued_tokens} tokens queued, limit "
                    f"{self.max_queue_tokens}); retry later.",
                    retry_after_s=self._retry_after(total),
                )
            await self._wait_for_room(total)
        if groups is not None and len(groups) != len(items):
            raise ValueError(f"{len(groups)} groups were given for {len(items)} items; give one per item.")
        loop = asyncio.get_running_loop()
        queued = [
            _Item[P, R](payload, n, loop.create_future(), *(group or (None, 0)))
            for (payload, n), group in zip(items, groups or [None] * len(items), strict=True)
        ]
        self._pending.extend(queued)
        self._queued_tokens += total
        self._observer.queue_changed(items=len(self._pending), tokens=self._queued_tokens)
        self._arrival.set()
        try:
            return list(await asyncio.gather(*(item.future for item in queued)))
        finally:
            dropped = [item.future.cancel() for item in queued]  # True for items not yet finished
            if any(dropped):
                self._prune()  # free their queue room now, not after the running forward

    async def _wait_for_room(self, tokens: int) -> None:
        """Wait until ``_admit`` lets this submit in; its room stays reserved until the submit, which runs on
        without yielding once this returns, has queued its items.

        Raises:
            Closed: the batcher began shutting down during the wait.
        """
        room: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (tokens, room)
        self._waiters.append(entry)
        self._observer.waiting_changed(len(self._waiters))
        try:
            await room
        except BaseException:
            if entry in self._waiters:  # cancelled while waiting: leave the line
                self._waiters.remove(entry)
                self._observer.waiting_changed(len(self._waiters))
            elif room.done() and not room.cancelled() and room.exception() is None:  # let in, then cancelled
                self._reserved -= tokens
            self._admit()
            raise
        self._reserved -= tokens

    def _admit(self) -> None:
        """Let waiters in, in arrival order, while the first one fits, reserving their room."""
        while self._waiters:
            tokens, room = self._waiters[0]
            if self._queued_tokens + self._reserved + tokens > self.max_queue_tokens:
                return
            self._waiters.popleft()
            self._observer.waiting_changed(len(self._waiters))
            if not room.done():
                self._reserved += tokens
                room.set_result(None)

    async def close(self, timeout_s: float) -> None:
        """Stop taking work, finish every accepted item, then stop the loop.

        Items still unfinished after ``timeout_s`` fail with ``Closed``, so nothing hangs.
        """
        self._closing = True
        while self._waiters:  # not yet accepted: they fail now, as new submits do
            _, room = self._waiters.popleft()
            self._observer.waiting_changed(len(self._waiters))
            if not room.done():
                room.set_exception(
                    Closed(
                        f"model {self.name!r} is shutting down and takes no new requests; retry on another replica."
                    )
                )
        deadline = time.monotonic() + timeout_s
        while (self._pending or self._busy) and time.monotonic() < deadline:
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                break
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        leftover, self._pending = self._pending, []
        for item in leftover:
            if not item.future.done():
                item.future.set_exception(
                    Closed(f"model {self.name!r} shut down before this input was scored.")
                )
        if leftover:
            self._queued_tokens = 0
            self._observer.queue_changed(items=0, tokens=0)

    def _retry_after(self, tokens: int) -> int:
        if self._tokens_per_s <= 0:
            return 1
        return max(1, math.ceil((self._queued_tokens + tokens - self.max_queue_tokens) / self._tokens_per_s))

    async def _loop(self) -> None:
        while True:
            await self._wait_for_batch()
            batch: list[_Item[P, R]] = []
            try:
                batch = self._take_batch()
                if batch:
                    await self._run(batch)
            except asyncio.CancelledError:
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(Closed(f"model {self.name!r} shut down during this batch."))
                raise
            except Exception as exc:  # a bug here must not leave requests hanging
                log.exception("batcher %s: unexpected error", self.name)
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(BatchFailed(f"internal batching error: {exc}"))
            finally:
                self._busy = False
                self._progress.set()

    async def _wait_for_batch(self) -> None:
        """Return once a batch should be cut: a full batch waits, or the oldest item's wait is over."""
        while True:
            self._prune()
            if not self._pending:
                self._arrival.clear()
                await self._arrival.wait()
                continue
            if (
                self._queued_tokens >= self.limits.max_batch_tokens
                or len(self._pending) >= self.limits.max_batch_size
                or (self._device_idle is not None and self._device_idle())
            ):
                return
            remaining = self._pending[0].enqueued + self.max_wait_s - time.monotonic()
            if remaining <= 0:
                return
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _prune(self) -> None:
        """Drop items whose future is already done (cancelled by a client that hung up)."""
        live = [item for item in self._pending if not item.future.done()]
        dropped = len(self._pending) - len(live)
        if dropped:
            self._pending = live
            self._queued_tokens = sum(item.n_tokens for item in live)
            self._observer.items_dropped(dropped)
            self._observer.queue_changed(items=len(live), tokens=self._queued_tokens)
            self._progress.set()
            self._admit()

    def _take_batch(self) -> list[_Item[P, R]]:
        self._prune()
        if not self._pending:
            return []
        window = self._pending[:WINDOW]
        chosen = self._group_batch(window)
        if not chosen:
            chosen = [window[i] for i in grow_batch([item.n_tokens for item in window], 0, self.limits)]
        taken = set(map(id, chosen))
        self._pending = [item for item in self._pending if id(item) not in taken]
        self._queued_tokens -= sum(item.n_tokens for item in chosen)
        self._busy = True
        self._observer.queue_changed(items=len(self._pending), tokens=self._queued_tokens)
        self._admit()
        return chosen

    def _group_batch(self, window: list[_Item[P, R]]) -> list[_Item[P, R]]:
        """The oldest item's prefix group, oldest first, within the batch caps; empty when it has no company.

        A group's cost counts its shared tokens once: the model computes them once.
        """
        anchor = window[0]
        if anchor.group is None:
            return []
        mates = [item for item in window if item.group == anchor.group]
        if len(mates) < 2:
            return []
        chosen, cost = [anchor], anchor.n_tokens
        for item in mates[1:]:
            added = item.n_tokens - min(item.shared, anchor.shared)
            if len(chosen) >= self.limits.max_batch_size or cost + added > self.limits.max_batch_tokens:
                break
            chosen.append(item)
            cost += added
        return chosen

    async def _run(self, batch: list[_Item[P, R]]) -> None:
        start = time.monotonic()
        self._batches += 1
        batch_id = self._batches
        queue_s = [start - item.enqueued for item in batch]
        real = sum(item.n_tokens for item in batch)
        padded = len(batch) * max(item.n_tokens for item in batch)
        loop = asyncio.get_running_loop()
        error: Exception | None = None
        try:
            values = await loop.run_in_executor(
                self._executor, self._run_batch, [item.payload for item in batch]
            )
            if len(values) != len(batch):
                raise RuntimeError(f"the model returned {len(values)} results for a batch of {len(batch)}")
        except Exception as exc:
            error = exc
        elapsed = time.monotonic() - start
        self._observer.batch_done(
            size=len(batch),
            real_tokens=real,
            padded_tokens=padded,
            queue_s=queue_s,
            inference_s=elapsed,
            ok=error is None,
        )
        if error is not None:
            log.error("batcher %s: forward of %d items failed: %s", self.name, len(batch), error)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(
                        BatchFailed(f"scoring failed for the batch holding this input: {error}")
                    )
            return
        rate = real / max(elapsed, 1e-9)
        self._tokens_per_s = rate if self._tokens_per_s <= 0 else 0.8 * self._tokens_per_s + 0.2 * rate
        for item, value, waited in zip(batch, values, queue_s, strict=True):
            if not item.future.done():
                item.future.set_result(ItemResult(value, waited, elapsed, batch_id, len(batch)))
