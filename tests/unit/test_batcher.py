"""The batcher with a fake forward (x -> x * x): grouping, failures, cancellation, back-pressure, shutdown."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from rmserve.batching.batcher import Batcher, BatchFailed, Closed, Overloaded, RequestTooLarge
from rmserve.batching.planning import BatchLimits

pytestmark = pytest.mark.anyio


class FakeForward:
    """Squares int payloads; records batches; can block on a gate or fail for a given payload."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail_on: int | None = None
        self.wrong_count_on: int | None = None

    def __call__(self, payloads: list[int]) -> list[int]:
        self.started.set()
        assert self.gate.wait(10)
        self.batches.append(list(payloads))
        if self.fail_on in payloads:
            raise RuntimeError(f"boom on {self.fail_on}")
        if self.wrong_count_on in payloads:
            return [0]
        return [p * p for p in payloads]


class Recorder:
    def __init__(self) -> None:
        self.batches: list[dict] = []
        self.queue: list[tuple[int, int]] = []
        self.dropped = 0

    def batch_done(self, **kw) -> None:
        self.batches.append(kw)

    def queue_changed(self, *, items: int, tokens: int) -> None:
        self.queue.append((items, tokens))

    def items_dropped(self, count: int) -> None:
        self.dropped += count


@pytest.fixture
def executor():
    pool = ThreadPoolExecutor(1)
    yield pool
    pool.shutdown(wait=True)


def make(
    forward, executor, *, tokens=1000, size=8, wait=0.0, queue=10_000, observer=None
) -> Batcher[int, int]:
    b = Batcher(
        forward,
        executor=executor,
        limits=BatchLimits(tokens, size),
        max_wait_s=wait,
        max_queue_tokens=queue,
        observer=observer,
        name="fake",
    )
    b.start()
    return b


async def wait_started(forward: FakeForward) -> None:
    await asyncio.to_thread(forward.started.wait, 5)


async def test_results_in_input_order(executor):
    forward = FakeForward()
    b = make(forward, executor)
    results = await b.submit([(3, 1), (1, 5), (2, 2)])
    assert [r.value for r in results] == [9, 1, 4]
    assert len({r.batch_id for r in results}) == 1
    assert {r.batch_size for r in results} == {3}
    await b.close(1)


async def test_concurrent_single_submits_are_grouped(executor):
    forward = FakeForward()
    forward.gate.clear()
    b = make(forward, executor, size=16)
    first = asyncio.create_task(b.submit([(0, 1)]))
    await wait_started(forward)  # item 0 is in the forward; the next 32 queue behind it
    rest = [asyncio.create_task(b.submit([(i, 1)])) for i in range(1, 33)]
    await asyncio.sleep(0.05)
    forward.gate.set()
    results = await asyncio.gather(first, *rest)
    assert [r[0].value for r in results] == [i * i for i in range(33)]
    assert [len(batch) for batch in forward.batches] == [1, 16, 16]
    await b.close(1)


async def test_token_budget_counts_padding(executor):
    forward = FakeForward()
    forward.gate.clear()
    rec = Recorder()
    b = make(forward, executor, tokens=40, size=64, observer=rec)
    first = asyncio.create_task(b.submit([(100, 1)]))
    await wait_started(forward)
    sizes = [10, 10, 10, 10, 20, 20]  # 4 x 10 = 40 fits; 20s go two by two
    tasks = [asyncio.create_task(b.submit([(i, n)])) for i, n in enumerate(sizes)]
    await asyncio.sleep(0.05)
    forward.gate.set()
    await asyncio.gather(first, *tasks)
    assert forward.batches[1:] == [[0, 1, 2, 3], [4, 5]]
    assert [(x["size"], x["real_tokens"], x["padded_tokens"]) for x in rec.batches] == [
        (1, 1, 1),
        (4, 40, 40),
        (2, 40, 40),
    ]
    assert all(x["ok"] for x in rec.batches)
    assert rec.queue[-1] == (0, 0)
    await b.close(1)


async def test_a_failing_batch_fails_only_its_requests(executor):
    forward = FakeForward()
    forward.gate.clear()
    b = make(forward, executor, size=2)
    blocker = asyncio.create_task(b.submit([(1, 1)]))
    await wait_started(forward)
    doomed = asyncio.create_task(b.submit([(7, 1)]))
    sibling = asyncio.create_task(b.submit([(8, 1)]))
    later = asyncio.create_task(b.submit([(9, 1)]))
    await asyncio.sleep(0.05)
    forward.fail_on = 7
    forward.gate.set()
    assert (await blocker)[0].value == 1
    for task in (doomed, sibling):
        with pytest.raises(BatchFailed, match="boom on 7"):
            await task
    assert (await later)[0].value == 81
    assert forward.batches == [[1], [7, 8], [9]]
    forward.fail_on = None
    assert (await b.submit([(5, 1)]))[0].value == 25  # still serving
    await b.close(1)


async def test_wrong_result_count_fails_the_batch(executor):
    forward = FakeForward()
    forward.wrong_count_on = 4
    b = make(forward, executor)
    with pytest.raises(BatchFailed, match="returned 1 results for a batch of 2"):
        await b.submit([(4, 1), (5, 1)])
    await b.close(1)


async def test_cancelled_items_are_never_computed(executor):
    forward = FakeForward()
    forward.gate.clear()
    rec = Recorder()
    b = make(forward, executor, observer=rec)
    blocker = asyncio.create_task(b.submit([(1, 3)]))
    await wait_started(forward)
    leaving = asyncio.create_task(b.submit([(66, 5), (67, 5)]))
    staying = asyncio.create_task(b.submit([(2, 4)]))
    await asyncio.sleep(0.05)
    assert (b.queued_items, b.queued_tokens) == (3, 14)
    leaving.cancel()
    await asyncio.gather(leaving, return_exceptions=True)
    forward.gate.set()
    await blocker
    assert (await staying)[0].value == 4
    assert forward.batches == [[1], [2]]
    assert rec.dropped == 2
    assert (b.queued_items, b.queued_tokens) == (0, 0)
    await b.close(1)


async def test_back_pressure(executor):
    forward = FakeForward()
    forward.gate.clear()
    b = make(forward, executor, queue=10, size=1)
    blocker = asyncio.create_task(b.submit([(1, 6)]))
    await wait_started(forward)
    queued = asyncio.create_task(b.submit([(2, 6)]))
    await asyncio.sleep(0.05)
    with pytest.raises(Overloaded, match="overloaded") as overloaded:
        await b.submit([(3, 6)])
    assert overloaded.value.retry_after_s >= 1
    with pytest.raises(RequestTooLarge, match="split it"):
        await b.submit([(4, 6), (5, 6)])
    forward.gate.set()
    await asyncio.gather(blocker, queued)
    assert [p for batch in forward.batches for p in batch] == [1, 2]
    await b.close(1)


async def test_close_finishes_accepted_work_then_refuses(executor):
    forward = FakeForward()
    forward.gate.clear()
    b = make(forward, executor, size=1)
    accepted = [asyncio.create_task(b.submit([(i, 1)])) for i in range(3)]
    await wait_started(forward)
    closing = asyncio.create_task(b.close(5))
    await asyncio.sleep(0.05)
    with pytest.raises(Closed, match="shutting down"):
        await b.submit([(9, 1)])
    forward.gate.set()
    await closing
    assert [(await t)[0].value for t in accepted] == [0, 1, 4]


async def test_close_timeout_fails_leftovers_instead_of_hanging(executor):
    forward = FakeForward()
    forward.gate.clear()
    b = make(forward, executor, size=1)
    running = asyncio.create_task(b.submit([(1, 1)]))
    await wait_started(forward)
    waiting = asyncio.create_task(b.submit([(2, 1)]))
    await asyncio.sleep(0.02)
    await b.close(0.1)
    for task in (running, waiting):
        with pytest.raises(Closed, match="shut down"):
            await task
    forward.gate.set()


async def test_max_wait_gathers_company(executor):
    forward = FakeForward()
    b = make(forward, executor, wait=0.3)
    first = asyncio.create_task(b.submit([(1, 1)]))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(b.submit([(2, 1)]))
    await asyncio.gather(first, second)
    assert forward.batches == [[1, 2]]
    await b.close(1)


async def test_no_wait_runs_a_lone_item_at_once(executor):
    forward = FakeForward()
    b = make(forward, executor, wait=0.0)
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert (await b.submit([(3, 1)]))[0].value == 9
    assert loop.time() - start < 0.25
    await b.close(1)


async def test_full_batch_does_not_wait(executor):
    forward = FakeForward()
    b = make(forward, executor, wait=30.0, size=2)
    results = await asyncio.wait_for(b.submit([(1, 1), (2, 1)]), 5)
    assert [r.value for r in results] == [1, 4]
    await b.close(1)
