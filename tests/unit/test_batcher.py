"""The batcher with a fake forward (x -> x * x): grouping, failures, cancellation, back-pressure, shutdown.

Order is made deterministic with events, not sleeps: a forward blocked on a ``threading.Event`` holds
the executor while the test queues more items, and ``settle`` steps the event loop until the queue
holds what the test expects.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from rmserve.batching.batcher import (
    Batcher,
    BatchFailed,
    BatchObserver,
    Closed,
    ItemResult,
    Overloaded,
    RequestTooLarge,
)
from rmserve.batching.device import DeviceExecutor
from rmserve.batching.planning import BatchLimits

pytestmark = [pytest.mark.unit, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeForward:
    """Squares int payloads and records every batch it receives.

    It can block on ``gate`` (to hold the executor), sleep ``delay`` seconds, raise for a batch holding
    ``fail_on``, or return one result too few for a batch holding ``short_on``.
    """

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.delay = 0.0
        self.fail_on: int | None = None
        self.short_on: int | None = None

    def __call__(self, payloads: list[int]) -> list[int]:
        self.started.set()
        assert self.gate.wait(5), "the test never released the gate"
        if self.delay:
            time.sleep(self.delay)
        self.batches.append(list(payloads))
        if self.fail_on in payloads:
            raise RuntimeError(f"boom on {self.fail_on}")
        if self.short_on in payloads:
            return [p * p for p in payloads][:-1]
        return [p * p for p in payloads]

    async def wait_started(self) -> None:
        """Wait until the first batch is inside the forward (holding the executor if the gate is shut)."""
        assert await asyncio.to_thread(self.started.wait, 5), "no batch reached the forward"


class Recorder:
    """An observer that records every call."""

    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []
        self.queue: list[tuple[int, int]] = []
        self.dropped: list[int] = []
        self.waiting: list[int] = []

    def batch_done(self, **kw: Any) -> None:
        self.batches.append(kw)

    def queue_changed(self, *, items: int, tokens: int) -> None:
        self.queue.append((items, tokens))

    def waiting_changed(self, requests: int) -> None:
        self.waiting.append(requests)

    def items_dropped(self, count: int) -> None:
        self.dropped.append(count)


@pytest.fixture
def forward() -> FakeForward:
    return FakeForward()


@pytest.fixture
def executor(forward: FakeForward) -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(1)
    yield pool
    forward.gate.set()  # never leave the worker thread blocked
    pool.shutdown(wait=True)


def make(
    run_batch: Callable[[list[int]], Any],
    executor: ThreadPoolExecutor,
    *,
    tokens: int = 1000,
    size: int = 8,
    wait: float = 0.0,
    queue: int = 10_000,
    observer: BatchObserver | None = None,
) -> Batcher[int, int]:
    b: Batcher[int, int] = Batcher(
        run_batch,
        executor=executor,
        limits=BatchLimits(tokens, size),
        max_wait_s=wait,
        max_queue_tokens=queue,
        observer=observer,
        name="fake",
    )
    b.start()
    return b


async def settle(condition: Callable[[], bool], steps: int = 200) -> None:
    """Step the event loop (no wall clock) until ``condition`` holds."""
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the event loop settled without reaching the condition")


async def drain(executor: ThreadPoolExecutor) -> None:
    """Wait until every job already given to the one-thread executor has finished."""
    await asyncio.wrap_future(executor.submit(lambda: None))


# --- results and grouping -------------------------------------------------------------------------


async def test_results_in_input_order(forward, executor):
    b = make(forward, executor)
    results = await b.submit([(3, 1), (1, 5), (2, 2)])
    assert [r.value for r in results] == [9, 1, 4]
    assert [(r.batch_id, r.batch_size) for r in results] == [(1, 3)] * 3
    assert forward.batches == [[3, 2, 1]]  # the forward sees them in length order (1, 2, 5 tokens)
    await b.close(1)


async def test_empty_submit_returns_nothing_and_queues_nothing(forward, executor):
    rec = Recorder()
    b = make(forward, executor, observer=rec)
    assert await b.submit([]) == []
    await b.close(1)
    assert (forward.batches, rec.queue, rec.batches) == ([], [], [])


async def test_start_twice_runs_one_loop(forward, executor):
    b = make(forward, executor)
    b.start()
    assert [t.get_name() for t in asyncio.all_tasks()].count("batcher-fake") == 1
    assert (await b.submit([(4, 1)]))[0].value == 16
    await b.close(1)
    assert [t.get_name() for t in asyncio.all_tasks()].count("batcher-fake") == 0


async def test_item_results_carry_their_batch(forward, executor):
    b = make(forward, executor, size=2)
    # lengths 5, 1, 5, 1: around the oldest (a 5) the other 5 adds no padding, so the 5s go first
    results = await b.submit([(0, 5), (1, 1), (2, 5), (3, 1)])
    assert forward.batches == [[0, 2], [1, 3]]
    assert [r.value for r in results] == [0, 1, 4, 9]
    assert [r.batch_id for r in results] == [1, 2, 1, 2]
    assert [r.batch_size for r in results] == [2, 2, 2, 2]
    assert results[0].inference_s == results[2].inference_s >= 0
    assert results[1].inference_s == results[3].inference_s >= 0
    assert 0 <= results[0].queue_s <= results[1].queue_s  # the second batch waited for the first
    with pytest.raises(dataclasses.FrozenInstanceError):
        results[0].value = 1  # type: ignore[misc]
    assert isinstance(results[0], ItemResult)
    await b.close(1)


async def test_concurrent_single_submits_are_grouped(forward, executor):
    forward.gate.clear()
    b = make(forward, executor, size=16)
    first = asyncio.create_task(b.submit([(0, 1)]))
    await forward.wait_started()  # item 0 holds the executor; the next 32 queue behind it
    rest = asyncio.ensure_future(asyncio.gather(*(b.submit([(i, 1)]) for i in range(1, 33))))
    await settle(lambda: b.queued_items == 32)
    assert forward.batches == []
    forward.gate.set()
    results = [await first, *await rest]
    assert [r[0].value for r in results] == [i * i for i in range(33)]
    assert forward.batches == [[0], list(range(1, 17)), list(range(17, 33))]
    assert [r[0].batch_id for r in results] == [1] + [2] * 16 + [3] * 16
    assert [r[0].batch_size for r in results] == [1] + [16] * 32
    await b.close(1)


async def test_token_budget_counts_padding(forward, executor):
    forward.gate.clear()
    rec = Recorder()
    b = make(forward, executor, tokens=40, size=64, observer=rec)
    first = asyncio.create_task(b.submit([(100, 1)]))
    await forward.wait_started()
    sizes = [10, 10, 10, 10, 20, 20]  # 4 x 10 = 40 fits; a 20 would make 5 x 20; the 20s go as a pair
    tasks = [asyncio.create_task(b.submit([(i, n)])) for i, n in enumerate(sizes)]
    await settle(lambda: b.queued_items == 6)
    forward.gate.set()
    await asyncio.gather(first, *tasks)
    assert forward.batches == [[100], [0, 1, 2, 3], [4, 5]]
    assert [(x["size"], x["real_tokens"], x["padded_tokens"], x["ok"]) for x in rec.batches] == [
        (1, 1, 1, True),
        (4, 40, 40, True),
        (2, 40, 40, True),
    ]
    assert rec.queue[-1] == (0, 0)
    await b.close(1)


async def test_every_batch_respects_the_padded_budget_and_size(forward, executor):
    forward.gate.clear()
    rec = Recorder()
    b = make(forward, executor, tokens=100, size=6, observer=rec)
    rng = random.Random(5)
    lengths = [rng.randint(1, 50) for _ in range(40)]
    blocker = asyncio.create_task(b.submit([(-1, 1)]))
    await forward.wait_started()
    tasks = [asyncio.create_task(b.submit([(i, n)])) for i, n in enumerate(lengths)]
    await settle(lambda: b.queued_items == 40)
    forward.gate.set()
    await blocker
    assert [(await t)[0].value for t in tasks] == [i * i for i in range(40)]
    batches = forward.batches[1:]
    assert sorted(p for batch in batches for p in batch) == list(range(40))  # each item computed once
    for batch in batches:
        assert 1 <= len(batch) <= 6
        assert len(batch) * max(lengths[p] for p in batch) <= 100
    assert len(batches) < 40  # grouped, not one by one
    done = rec.batches[1:]
    assert [x["size"] for x in done] == [len(batch) for batch in batches]
    assert [x["real_tokens"] for x in done] == [sum(lengths[p] for p in batch) for batch in batches]
    assert [x["padded_tokens"] for x in done] == [
        len(batch) * max(lengths[p] for p in batch) for batch in batches
    ]
    assert (b.queued_items, b.queued_tokens) == (0, 0)
    await b.close(1)


# --- failures -------------------------------------------------------------------------------------


async def test_a_failing_batch_fails_only_its_requests(forward, executor):
    forward.gate.clear()
    forward.fail_on = 7
    rec = Recorder()
    b = make(forward, executor, size=2, observer=rec)
    blocker = asyncio.create_task(b.submit([(1, 1)]))
    await forward.wait_started()
    doomed = asyncio.create_task(b.submit([(7, 1)]))
    sibling = asyncio.create_task(b.submit([(8, 1)]))
    later = asyncio.create_task(b.submit([(9, 1)]))
    await settle(lambda: b.queued_items == 3)
    forward.gate.set()
    assert (await blocker)[0].value == 1
    for task in (doomed, sibling):
        with pytest.raises(BatchFailed) as failed:
            await task
        assert str(failed.value) == "scoring failed for the batch holding this input: boom on 7"
    assert (await later)[0].value == 81
    assert forward.batches == [[1], [7, 8], [9]]
    assert [x["ok"] for x in rec.batches] == [True, False, True]
    assert (await b.submit([(5, 1)]))[0].value == 25  # still serving
    await b.close(1)


async def test_wrong_result_count_fails_the_batch(forward, executor):
    forward.short_on = 4
    b = make(forward, executor)
    with pytest.raises(BatchFailed) as failed:
        await b.submit([(4, 1), (5, 1)])
    assert str(failed.value) == (
        "scoring failed for the batch holding this input: the model returned 1 results for a batch of 2"
    )
    assert (await b.submit([(6, 1)]))[0].value == 36  # still serving
    await b.close(1)


async def test_too_many_results_fail_the_batch(executor):
    b = make(lambda payloads: [0] * (len(payloads) + 1), executor)
    with pytest.raises(BatchFailed, match=r"the model returned 3 results for a batch of 2$"):
        await b.submit([(1, 1), (2, 1)])
    await b.close(1)


async def test_an_internal_error_fails_the_batch_instead_of_hanging(forward, executor):
    class BrokenObserver(Recorder):
        def batch_done(self, **kw: Any) -> None:
            raise ValueError("metrics broke")

    b = make(forward, executor, observer=BrokenObserver())
    with pytest.raises(BatchFailed) as failed:
        await asyncio.wait_for(b.submit([(2, 1)]), 2)
    assert str(failed.value) == "internal batching error: metrics broke"
    with pytest.raises(BatchFailed):  # the loop survived and serves the next batch
        await asyncio.wait_for(b.submit([(3, 1)]), 2)
    assert forward.batches == [[2], [3]]
    await b.close(1)


# --- cancellation ---------------------------------------------------------------------------------


async def test_cancelled_items_are_never_computed(forward, executor):
    forward.gate.clear()
    rec = Recorder()
    b = make(forward, executor, observer=rec)
    blocker = asyncio.create_task(b.submit([(1, 3)]))
    await forward.wait_started()
    leaving = asyncio.create_task(b.submit([(66, 5), (67, 5)]))
    staying = asyncio.create_task(b.submit([(2, 4)]))
    await settle(lambda: b.queued_items == 3)
    assert b.queued_tokens == 14
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    forward.gate.set()
    assert (await blocker)[0].value == 1
    assert (await staying)[0].value == 4
    assert forward.batches == [[1], [2]]
    assert rec.dropped == [2]
    assert (b.queued_items, b.queued_tokens) == (0, 0)
    # queued (1, 3) -> taken -> +2 leaving -> +1 staying -> 2 dropped -> taken
    assert rec.queue == [(1, 3), (0, 0), (2, 10), (3, 14), (1, 4), (0, 0)]
    await b.close(1)


async def test_an_item_cancelled_while_waiting_for_company_is_never_computed(forward, executor):
    rec = Recorder()
    b = make(forward, executor, wait=0.05, observer=rec)
    task = asyncio.create_task(b.submit([(5, 2)]))
    await settle(lambda: b.queued_items == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(b.close(1), 2)  # returns once the loop has dropped it
    assert forward.batches == []
    assert rec.dropped == [1]
    assert rec.batches == []
    assert rec.queue == [(1, 2), (0, 0)]
    assert (b.queued_items, b.queued_tokens) == (0, 0)


# --- back-pressure --------------------------------------------------------------------------------


async def test_overloaded_and_request_too_large(forward, executor):
    forward.gate.clear()
    b = make(forward, executor, queue=10, size=1)
    blocker = asyncio.create_task(b.submit([(1, 6)]))  # taken into the forward: no longer queued
    await forward.wait_started()
    queued = asyncio.create_task(b.submit([(2, 6)]))
    await settle(lambda: b.queued_items == 1)
    with pytest.raises(Overloaded) as overloaded:
        await b.submit([(3, 5)])  # 6 + 5 > 10
    assert str(overloaded.value) == "model 'fake' is overloaded (6 tokens queued, limit 10); retry later."
    assert overloaded.value.retry_after_s == 1  # no throughput measured yet: the minimum
    with pytest.raises(RequestTooLarge) as too_large:
        await b.submit([(4, 6), (5, 6)])  # 12 > 10 even with an empty queue
    assert str(too_large.value) == (
        "the request holds 12 tokens but model 'fake' queues at most 10; split it into smaller requests."
    )
    assert (b.queued_items, b.queued_tokens) == (1, 6)  # refused submits queue nothing
    fits = asyncio.create_task(b.submit([(3, 4)]))  # 6 + 4 = 10: exactly the limit
    await settle(lambda: b.queued_items == 2)
    forward.gate.set()
    results = await asyncio.gather(blocker, queued, fits)
    assert [r[0].value for r in results] == [1, 4, 9]
    assert forward.batches == [[1], [2], [3]]
    await b.close(1)


async def test_retry_after_follows_the_measured_throughput(forward, executor):
    b = make(forward, executor, queue=200, size=1)
    forward.delay = 0.1
    await b.submit([(1, 1)])  # 1 token in >= 0.1 s: at most 10 tokens/s
    forward.delay = 0.0
    forward.started.clear()
    forward.gate.clear()
    blocker = asyncio.create_task(b.submit([(2, 1)]))
    await forward.wait_started()
    queued = asyncio.create_task(b.submit([(3, 100)]))
    await settle(lambda: b.queued_items == 1)
    with pytest.raises(Overloaded) as overloaded:
        await b.submit([(4, 200)])  # 100 tokens over the limit at <= 10 tokens/s
    assert isinstance(overloaded.value.retry_after_s, int)
    assert 10 <= overloaded.value.retry_after_s <= 100
    forward.gate.set()
    await asyncio.gather(blocker, queued)
    await b.close(1)


async def six_of_ten_queued(forward, executor, observer=None):
    """A batcher (queue of 10 tokens) whose forward holds item 1 (gate shut) while item 2 (6 tokens) waits."""
    forward.gate.clear()
    b = make(forward, executor, queue=10, size=1, observer=observer)
    blocker = asyncio.create_task(b.submit([(1, 6)]))  # in the forward
    await forward.wait_started()
    queued = asyncio.create_task(b.submit([(2, 6)]))  # 6 of 10 queued
    await settle(lambda: b.queued_items == 1)
    return b, blocker, queued


async def test_a_waiting_submit_gets_room_in_arrival_order_and_no_one_jumps_the_line(forward, executor):
    rec = Recorder()
    b, blocker, queued = await six_of_ten_queued(forward, executor, rec)
    big = asyncio.create_task(b.submit([(3, 8)], wait=True))  # 6 + 8 > 10: waits
    small = asyncio.create_task(b.submit([(4, 1)], wait=True))  # would fit, but waits behind big
    await settle(lambda: b.waiting_requests == 2)
    with pytest.raises(Overloaded):
        await b.submit([(5, 1)])  # 6 + 1 fits, but a request waits for room: 429 for the impatient
    assert (b.queued_items, b.queued_tokens) == (1, 6)
    forward.gate.set()
    results = await asyncio.gather(blocker, queued, big, small)
    assert [r[0].value for r in results] == [1, 4, 9, 16]
    assert forward.batches == [[1], [2], [3], [4]]  # big went in before small
    assert b.waiting_requests == 0
    assert rec.waiting == [1, 2, 1, 0]  # the gauge of requests waiting for room
    await b.close(1)


async def test_a_cancelled_wait_leaves_the_line_and_frees_its_place(forward, executor):
    b, blocker, queued = await six_of_ten_queued(forward, executor)
    big = asyncio.create_task(b.submit([(3, 8)], wait=True))
    small = asyncio.create_task(b.submit([(4, 4)], wait=True))
    await settle(lambda: b.waiting_requests == 2)
    big.cancel()  # its client hung up (or its request timed out)
    await settle(lambda: b.queued_items == 2)  # small fits beside the queued 6 now: let in at once
    assert b.waiting_requests == 0 and b.queued_tokens == 10
    forward.gate.set()
    assert [r[0].value for r in await asyncio.gather(blocker, queued, small)] == [1, 4, 16]
    assert big.cancelled()
    assert forward.batches == [[1], [2], [4]]  # the cancelled wait never queued its item
    await b.close(1)


async def test_close_ends_waits_for_room(forward, executor):
    b, blocker, queued = await six_of_ten_queued(forward, executor)
    waiting = asyncio.create_task(b.submit([(3, 8)], wait=True))
    await settle(lambda: b.waiting_requests == 1)
    closing = asyncio.create_task(b.close(5))
    with pytest.raises(Closed, match="is shutting down and takes no new requests"):
        await waiting
    forward.gate.set()
    await asyncio.wait_for(closing, 2)
    assert [r[0].value for r in await asyncio.gather(blocker, queued)] == [1, 4]  # accepted work finished
    assert forward.batches == [[1], [2]]


# --- shutdown -------------------------------------------------------------------------------------


async def test_close_finishes_accepted_work_then_refuses(forward, executor):
    forward.gate.clear()
    rec = Recorder()
    b = make(forward, executor, size=1, observer=rec)
    accepted = [asyncio.create_task(b.submit([(i, 1)])) for i in range(3)]
    await forward.wait_started()
    closing = asyncio.create_task(b.close(5))
    await asyncio.sleep(0)  # one loop step: close() has started and stopped intake
    with pytest.raises(Closed) as closed:
        await b.submit([(9, 1)])
    assert str(closed.value) == (
        "model 'fake' is shutting down and takes no new requests; retry on another replica."
    )
    assert not closing.done()
    forward.gate.set()
    await asyncio.wait_for(closing, 2)
    assert [(await t)[0].value for t in accepted] == [0, 1, 4]
    assert forward.batches == [[0], [1], [2]]
    assert (b.queued_items, b.queued_tokens) == (0, 0)
    assert rec.queue[-1] == (0, 0)
    with pytest.raises(Closed):
        await b.submit([(9, 1)])
    with pytest.raises(Closed):
        await b.submit([])


async def test_close_when_idle_returns_at_once(forward, executor):
    b = make(forward, executor)
    assert (await b.submit([(2, 1)]))[0].value == 4
    await asyncio.wait_for(b.close(30), 1)
    with pytest.raises(Closed):
        await b.submit([(3, 1)])


async def test_close_timeout_fails_leftovers_instead_of_hanging(forward, executor):
    forward.gate.clear()
    b = make(forward, executor, size=1)
    running = asyncio.create_task(b.submit([(1, 1)]))
    await forward.wait_started()
    waiting = asyncio.create_task(b.submit([(2, 1)]))
    await settle(lambda: b.queued_items == 1)
    await asyncio.wait_for(b.close(0.05), 2)
    with pytest.raises(Closed) as closed:
        await running
    assert str(closed.value) == "model 'fake' shut down during this batch."
    with pytest.raises(Closed) as closed:
        await waiting
    assert str(closed.value) == "model 'fake' shut down before this input was scored."
    assert (b.queued_items, b.queued_tokens) == (0, 0)
    forward.gate.set()
    await drain(executor)
    assert forward.batches == [[1]]  # the queued item was never computed


# --- waiting for company --------------------------------------------------------------------------


async def test_max_wait_gathers_company(forward, executor):
    b = make(forward, executor, wait=0.3)
    first = asyncio.create_task(b.submit([(1, 1)]))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(b.submit([(2, 1)]))
    results = await asyncio.gather(first, second)
    assert forward.batches == [[1, 2]]
    assert [(r[0].batch_id, r[0].batch_size) for r in results] == [(1, 2), (1, 2)]
    assert results[0][0].queue_s >= 0.25  # the partial batch waited out the window
    await b.close(1)


async def test_no_wait_runs_a_lone_item_at_once(forward, executor):
    forward.gate.clear()
    b = make(forward, executor, wait=0.0)
    first = asyncio.create_task(b.submit([(1, 1)]))
    await forward.wait_started()  # in the forward alone, before any company arrived
    second = asyncio.create_task(b.submit([(2, 1)]))
    await settle(lambda: b.queued_items == 1)
    forward.gate.set()
    results = await asyncio.gather(first, second)
    assert forward.batches == [[1], [2]]
    assert results[0][0].queue_s < 0.2
    await b.close(1)


async def test_an_idle_device_runs_a_lone_item_at_once_and_a_busy_one_waits_for_company(forward, executor):
    idle = [True]
    b = make(forward, executor, wait=30.0)
    b._device_idle = lambda: idle[0]
    results = await asyncio.wait_for(b.submit([(3, 1)]), 2)  # no 30 s wait for company
    assert [r.value for r in results] == [9]
    idle[0] = False  # another model's forward holds the device: wait for company (here: a full batch)
    lone = asyncio.create_task(b.submit([(1, 1)]))
    await asyncio.sleep(0.05)
    assert b.queued_items == 1 and not lone.done()
    await b.submit([(i, 1) for i in range(2, 9)])  # fills the batch of 8
    assert [r.value for r in await lone] == [1]
    assert forward.batches == [[3], [1, 2, 3, 4, 5, 6, 7, 8]]
    await b.close(1)


async def test_the_device_executor_knows_when_it_is_idle():
    gate = threading.Event()
    device = DeviceExecutor("cpu")
    try:
        assert device.idle()
        running = device.submit(gate.wait, 5)
        queued = device.submit(lambda: 1)
        assert not device.idle()
        gate.set()
        assert running.result(5) is True and queued.result(5) == 1
        for _ in range(500):  # the done callbacks run on the worker thread just after the results are set
            if device.idle():
                break
            await asyncio.sleep(0.01)
        assert device.idle()
    finally:
        gate.set()
        device.shutdown(wait=True)


async def test_a_full_batch_does_not_wait(forward, executor):
    b = make(forward, executor, wait=30.0, size=2)
    results = await asyncio.wait_for(b.submit([(1, 1), (2, 1)]), 2)
    assert [r.value for r in results] == [1, 4]
    await b.close(1)


async def test_a_batch_full_in_tokens_does_not_wait(forward, executor):
    b = make(forward, executor, wait=30.0, tokens=10, size=8)
    results = await asyncio.wait_for(b.submit([(1, 5), (2, 5)]), 2)  # 2 x 5 = 10 tokens
    assert [r.value for r in results] == [1, 4]
    assert forward.batches == [[1, 2]]
    await b.close(1)


# --- observer -------------------------------------------------------------------------------------


async def test_observer_sees_each_batch_and_the_queue(forward, executor):
    rec = Recorder()
    b = make(forward, executor, observer=rec)
    results = await b.submit([(3, 3), (5, 5)])
    assert [r.value for r in results] == [9, 25]
    assert rec.queue == [(2, 8), (0, 0)]
    assert len(rec.batches) == 1
    done = rec.batches[0]
    assert set(done) == {"size", "real_tokens", "padded_tokens", "queue_s", "inference_s", "ok"}
    assert (done["size"], done["real_tokens"], done["padded_tokens"], done["ok"]) == (2, 8, 10, True)
    assert list(done["queue_s"]) == [results[0].queue_s, results[1].queue_s]
    assert done["inference_s"] == results[0].inference_s >= 0
    assert rec.dropped == []
    await b.close(1)


# --- prefix groups --------------------------------------------------------------------------------


async def test_the_oldest_items_prefix_group_is_batched_together(forward, executor):
    forward.gate.clear()
    b = make(forward, executor, tokens=1000, size=8)
    first = asyncio.create_task(b.submit([(0, 1)]))
    await forward.wait_started()
    # by length alone 1 and 2 (100 tokens) would go with 3 (100), apart from 4 and 5 (300 and 40)
    sizes = {1: 100, 2: 300, 3: 100, 4: 40, 5: 120}
    groups = {1: ("p", 30), 2: ("p", 30), 3: None, 4: ("p", 30), 5: ("q", 30)}
    tasks = [asyncio.create_task(b.submit([(i, n)], groups=[groups[i]])) for i, n in sizes.items()]
    await settle(lambda: b.queued_items == 5)
    forward.gate.set()
    await asyncio.gather(first, *tasks)
    assert forward.batches == [[0], [1, 2, 4], [3, 5]]
    await b.close(1)


async def test_a_group_counts_its_shared_tokens_once_within_the_budget(forward, executor):
    forward.gate.clear()
    b = make(forward, executor, tokens=400, size=8)
    first = asyncio.create_task(b.submit([(0, 1)]))
    await forward.wait_started()
    # each mate adds 150 - 100 tokens: six make 150 + 5 x 50 = 400, which fits 400; a seventh does not
    tasks = [asyncio.create_task(b.submit([(i, 150)], groups=[("p", 100)])) for i in range(1, 8)]
    await settle(lambda: b.queued_items == 7)
    forward.gate.set()
    await asyncio.gather(first, *tasks)
    assert forward.batches == [[0], [1, 2, 3, 4, 5, 6], [7]]
    await b.close(1)


async def test_a_lone_group_member_is_batched_by_length(forward, executor):
    forward.gate.clear()
    b = make(forward, executor, size=8)
    first = asyncio.create_task(b.submit([(0, 1)]))
    await forward.wait_started()
    tasks = [
        asyncio.create_task(b.submit([(1, 10)], groups=[("p", 8)])),
        asyncio.create_task(b.submit([(2, 10)])),
    ]
    await settle(lambda: b.queued_items == 2)
    forward.gate.set()
    await asyncio.gather(first, *tasks)
    assert forward.batches == [[0], [1, 2]]
    await b.close(1)


async def test_groups_must_match_the_items(forward, executor):
    b = make(forward, executor)
    with pytest.raises(ValueError, match="one per item"):
        await b.submit([(1, 1), (2, 1)], groups=[None])
    await b.close(1)
