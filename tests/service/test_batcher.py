import asyncio
import threading
import time

import numpy as np
import pytest

from service.batcher import DynamicBatcher
from service.errors import DeadlineExceeded, NotReady, Overloaded, ServiceError
from service.metrics import Metrics
from tests.service.conftest import wait_until


class FakeEngine:
    """Test double for the ONNX engine: a blocking numpy call, [n, ...] in, [n, 4] out, row i from input i.

    Output row i is `2 * sum(input row i)` repeated, so values prove which input a caller got back. `gate` holds
    a call inside the engine until the test opens it; `entered` says a call has started, `returned` that one
    has finished.
    """

    def __init__(self) -> None:
        self.calls: list[np.ndarray] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.returned = threading.Event()
        self.fail_with: Exception | None = None
        self.drop_a_row = False

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        self.calls.append(rows.copy())
        self.entered.set()
        self.gate.wait(30)
        try:
            if self.fail_with is not None:
                raise self.fail_with
            out = np.repeat((rows.reshape(len(rows), -1).sum(axis=1, keepdims=True) * 2).astype(np.float32), 4, axis=1)
            return out[:-1] if self.drop_a_row else out
        finally:
            self.returned.set()

    def seen(self) -> list[float]:
        return sorted(float(v) for call in self.calls for v in call.reshape(len(call), -1).sum(axis=1))

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 2), "the engine was never called"


def row(value: float, width: int = 2, dtype: type = np.float32) -> np.ndarray:
    """One input row whose values sum to `value`."""
    out = np.zeros((1, width), dtype)
    out[0, 0] = value
    return out


def later(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def make_batcher(engine, metrics):
    made: list[DynamicBatcher] = []

    async def make(**options) -> DynamicBatcher:
        options = {"max_batch_size": 32, "max_wait_ms": 5, "max_queue": 256} | options
        batcher = DynamicBatcher("image", engine, metrics=metrics, **options)
        await batcher.start()
        made.append(batcher)
        return batcher

    yield make
    engine.gate.set()
    for batcher in made:
        await asyncio.wait_for(batcher.stop(), 5)


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.value(name, {"engine": "image", **labels})


async def test_concurrent_single_rows_share_an_engine_call_and_each_gets_its_own_row(make_batcher, engine):
    batcher = await make_batcher(max_batch_size=32, max_wait_ms=20)
    results = await asyncio.gather(*(batcher.submit(row(i), deadline=later()) for i in range(32)))
    assert len(engine.calls) <= 2
    for i, result in enumerate(results):
        assert result.shape == (1, 4)
        np.testing.assert_array_equal(result, np.full((1, 4), 2 * i))


async def test_a_lone_item_runs_at_once_whatever_the_window(make_batcher, engine):
    # Nothing is queued behind it and the engine is idle: waiting for company could only add the window to its
    # latency (a 60 s window here, so any wait for it would show).
    batcher = await make_batcher(max_wait_ms=60_000)
    began = time.monotonic()
    result = await batcher.submit(row(3), deadline=later())
    np.testing.assert_array_equal(result, np.full((1, 4), 6))
    assert len(engine.calls) == 1
    assert time.monotonic() - began < 5.0  # loose: a loaded CI machine can stall any coroutine for a while


async def test_items_queued_together_wait_for_company_within_the_window(make_batcher, engine, metrics):
    batcher = await make_batcher(max_batch_size=3, max_wait_ms=60_000)
    first = [asyncio.create_task(batcher.submit(row(i), deadline=later(120))) for i in (1, 2)]
    await wait_until(lambda: metric(metrics, "clipserve_queue_wait_seconds_count") == 2, "the worker took both")
    assert engine.calls == []  # two queued together: the window is open for a third
    third = await batcher.submit(row(3), deadline=later())
    assert third[0, 0] == 6 and [r[0, 0] for r in await asyncio.gather(*first)] == [2, 4]
    assert [len(call) for call in engine.calls] == [3]


async def test_batches_never_exceed_max_batch_size(make_batcher, engine):
    batcher = await make_batcher(max_batch_size=4, max_wait_ms=20)
    sizes = [3, 2, 1, 4, 2, 1, 1, 3]
    items = [np.arange(n * 2, dtype=np.float32).reshape(n, 2) + 100 * k for k, n in enumerate(sizes)]
    results = await asyncio.gather(*(batcher.submit(item, deadline=later()) for item in items))
    assert all(len(call) <= 4 for call in engine.calls)
    assert sum(len(call) for call in engine.calls) == sum(sizes)
    for item, result in zip(items, results, strict=True):
        np.testing.assert_array_equal(result[:, 0], item.sum(axis=1) * 2)


async def test_an_item_bigger_than_a_batch_is_split_and_comes_back_whole_in_order(make_batcher, engine):
    batcher = await make_batcher(max_batch_size=4)
    item = np.stack([np.array([i, 0], np.float32) for i in range(10)])
    result = await batcher.submit(item, deadline=later())
    assert [len(call) for call in engine.calls] == [4, 4, 2]
    np.testing.assert_array_equal(result[:, 0], np.arange(10) * 2)


async def test_items_of_different_shape_or_dtype_are_not_concatenated(make_batcher, engine):
    batcher = await make_batcher(max_wait_ms=20)
    narrow, wide, ints = row(1, width=2), row(2, width=3), row(3, width=2, dtype=np.int64)
    results = await asyncio.gather(*(batcher.submit(x, deadline=later()) for x in (narrow, wide, ints)))
    assert [r[0, 0] for r in results] == [2, 4, 6]
    assert sorted((c.shape[1:], c.dtype.name) for c in engine.calls) == [
        ((2,), "float32"),
        ((2,), "int64"),
        ((3,), "float32"),
    ]


async def test_a_full_queue_refuses_with_overloaded_and_recovers(make_batcher, engine, metrics):
    batcher = await make_batcher(max_batch_size=2, max_wait_ms=0, max_queue=4)
    engine.gate.clear()
    running = asyncio.create_task(batcher.submit(row(1), deadline=later()))
    await engine.wait_entered()
    queued = [asyncio.create_task(batcher.submit(np.vstack([row(v), row(v)]), deadline=later())) for v in (2, 3)]
    await asyncio.sleep(0)
    assert batcher.depth == 4

    with pytest.raises(Overloaded) as refused:
        await batcher.submit(row(9), deadline=later())
    assert refused.value.status == 503
    assert refused.value.headers == {"Retry-After": "1"}
    assert metric(metrics, "clipserve_rejected_total", reason="queue_full") == 1

    engine.gate.set()
    await asyncio.wait_for(asyncio.gather(running, *queued), 2)
    assert batcher.depth == 0
    assert (await batcher.submit(row(4), deadline=later()))[0, 0] == 8


async def test_an_item_bigger_than_the_queue_bound_is_accepted_on_an_empty_queue(make_batcher, engine):
    batcher = await make_batcher(max_batch_size=2, max_queue=4)
    result = await batcher.submit(np.ones((6, 2), np.float32), deadline=later())
    assert result.shape == (6, 4)


async def test_an_item_whose_deadline_passed_in_the_queue_is_dropped(make_batcher, engine, metrics):
    batcher = await make_batcher(max_wait_ms=0)
    engine.gate.clear()
    running = asyncio.create_task(batcher.submit(row(1), deadline=later()))
    await engine.wait_entered()
    stale_deadline = later(0.1)
    stale = asyncio.create_task(batcher.submit(row(2), deadline=stale_deadline))
    await asyncio.sleep(0)
    engine.gate.set()
    # Block the loop (on purpose) until the engine call has returned and the stale item's deadline has passed, so
    # the worker takes the stale item as soon as the loop runs again. Should submit's own timer notice first
    # instead, the caller sees the same outcome.
    assert engine.returned.wait(30), "the engine call did not finish"
    while time.monotonic() <= stale_deadline:
        time.sleep(0.001)
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(stale, 2)
    await asyncio.wait_for(running, 2)
    assert engine.seen() == [1.0]
    assert batcher.depth == 0
    assert metric(metrics, "clipserve_rejected_total", reason="deadline") == 1


async def test_a_deadline_already_past_is_refused_without_queueing(make_batcher, engine, metrics):
    batcher = await make_batcher()
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(row(1), deadline=time.monotonic() - 1)
    assert engine.calls == []
    assert metric(metrics, "clipserve_rejected_total", reason="deadline") == 1


async def test_submit_stops_waiting_at_its_deadline(make_batcher, engine):
    batcher = await make_batcher(max_wait_ms=0)
    engine.gate.clear()  # the engine takes the item but never answers in time
    with pytest.raises(DeadlineExceeded) as late:
        await batcher.submit(row(1), deadline=later(0.05))
    assert late.value.status == 504
    # The caller was answered while the engine still held its call: without the deadline it would have waited.
    assert not engine.returned.is_set()
    engine.gate.set()
    assert (await batcher.submit(row(2), deadline=later()))[0, 0] == 4  # the late result went nowhere


async def test_a_cancelled_waiting_item_never_reaches_the_engine(make_batcher, engine, metrics):
    batcher = await make_batcher(max_wait_ms=0)
    engine.gate.clear()
    running = asyncio.create_task(batcher.submit(row(1), deadline=later()))
    await engine.wait_entered()
    abandoned = asyncio.create_task(batcher.submit(np.vstack([row(7), row(7)]), deadline=later()))
    await asyncio.sleep(0)
    assert batcher.depth == 2

    abandoned.cancel()
    with pytest.raises(asyncio.CancelledError):
        await abandoned
    assert batcher.depth == 0
    assert metric(metrics, "clipserve_queue_depth") == 0
    assert metric(metrics, "clipserve_rejected_total", reason="cancelled") == 1

    engine.gate.set()
    await asyncio.wait_for(running, 2)
    await batcher.submit(row(3), deadline=later())
    assert engine.seen() == [1.0, 3.0]


async def test_an_item_cancelled_while_its_batch_is_collected_is_skipped(make_batcher, engine, metrics):
    batcher = await make_batcher(max_batch_size=3, max_wait_ms=60_000)
    abandoned = [asyncio.create_task(batcher.submit(row(7), deadline=later(120))) for _ in range(2)]
    await wait_until(lambda: metric(metrics, "clipserve_queue_wait_seconds_count") == 2, "the worker took the items")
    assert batcher.depth == 0  # taken: queued together, they wait for company
    for task in abandoned:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # Rows of another width cannot join the batch, so they close it at once instead of the window's end: the
    # batch, all of it cancelled, must cost no engine call. They fill a batch of their own, which runs at once.
    served = await batcher.submit(np.vstack([row(3, width=3), row(4, width=3)]), deadline=later())
    assert served[:, 0].tolist() == [6, 8]
    assert [call.shape for call in engine.calls] == [(2, 3)]


async def test_an_engine_error_fails_its_batch_and_the_worker_keeps_serving(make_batcher, engine):
    batcher = await make_batcher(max_wait_ms=20)
    engine.fail_with = RuntimeError("engine exploded")
    outcomes = await asyncio.gather(
        *(batcher.submit(row(i), deadline=later()) for i in range(3)), return_exceptions=True
    )
    assert all(isinstance(o, RuntimeError) and str(o) == "engine exploded" for o in outcomes)
    engine.fail_with = None
    assert (await batcher.submit(row(5), deadline=later()))[0, 0] == 10


async def test_an_engine_that_returns_the_wrong_number_of_rows_fails_its_callers(make_batcher, engine):
    batcher = await make_batcher(max_wait_ms=20)
    engine.drop_a_row = True
    calls = (batcher.submit(row(i), deadline=later()) for i in range(3))
    outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 2)
    assert all(type(o) is ServiceError and o.status == 500 and "rows" in o.message for o in outcomes)
    engine.drop_a_row = False
    assert (await batcher.submit(row(5), deadline=later()))[0, 0] == 10


async def test_stop_fails_waiting_items_and_ends_the_worker(make_batcher, engine, metrics):
    batcher = await make_batcher(max_batch_size=1, max_wait_ms=0)
    engine.gate.clear()
    running = asyncio.create_task(batcher.submit(row(1), deadline=later()))
    await engine.wait_entered()
    waiting = asyncio.create_task(batcher.submit(row(2), deadline=later()))
    await asyncio.sleep(0)

    stopping = asyncio.create_task(batcher.stop())
    with pytest.raises(NotReady):
        await asyncio.wait_for(waiting, 2)
    engine.gate.set()
    await asyncio.wait_for(stopping, 2)
    assert (await running)[0, 0] == 2  # the call already in the engine finishes
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "clipserve-batcher-image"]
    assert batcher.depth == 0
    assert engine.seen() == [1.0]
    with pytest.raises(NotReady):
        await batcher.submit(row(3), deadline=later())


async def test_stop_does_not_wait_out_a_collecting_window(make_batcher, engine, metrics):
    batcher = await make_batcher(max_wait_ms=600_000)
    waiting = [asyncio.create_task(batcher.submit(row(1), deadline=later(600))) for _ in range(2)]
    await wait_until(lambda: metric(metrics, "clipserve_queue_wait_seconds_count") == 2, "the worker took the items")
    # The bound is far inside the 10-minute window, and far beyond what stopping takes even on a loaded machine.
    await asyncio.wait_for(batcher.stop(), 30)
    for task in waiting:
        with pytest.raises(NotReady):
            await task
    assert engine.calls == []


async def test_metrics_follow_engine_calls_and_the_queue(make_batcher, engine, metrics):
    batcher = await make_batcher(max_batch_size=4, max_wait_ms=5)
    await asyncio.gather(*(batcher.submit(row(i), deadline=later()) for i in range(10)))
    await batcher.submit(np.ones((9, 2), np.float32), deadline=later())
    assert metric(metrics, "clipserve_batch_size_count") == len(engine.calls)
    assert metric(metrics, "clipserve_batch_size_sum") == 19
    assert metric(metrics, "clipserve_engine_seconds_count") == len(engine.calls)
    assert metric(metrics, "clipserve_queue_wait_seconds_count") == 11
    assert metric(metrics, "clipserve_queue_depth") == 0


async def test_background_items_wait_for_live_ones_and_run_alone(make_batcher, engine, metrics):
    """Preparing a saved classifier must not delay live requests: queued background items run only when no live
    item waits, one per engine call, and they are not counted against max_queue."""
    batcher = await make_batcher(max_wait_ms=0, max_queue=2)
    engine.gate.clear()
    first = asyncio.create_task(batcher.submit(row(1), deadline=later(), background=True))
    await engine.wait_entered()  # the engine is busy with the first background item
    background = [asyncio.create_task(batcher.submit(row(10 + i), deadline=later(), background=True)) for i in range(3)]
    await asyncio.sleep(0)
    live = [asyncio.create_task(batcher.submit(row(100 + i), deadline=later())) for i in range(2)]
    await wait_until(lambda: batcher.depth == 2, "both live items queued")
    engine.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *background, *live), 30)
    order = [[float(v) for v in call.sum(axis=1)] for call in engine.calls]
    assert order == [[1.0], [100.0, 101.0], [10.0], [11.0], [12.0]]  # live first, joined; background alone
    assert metric(metrics, "clipserve_rejected_total", reason="queue_full") == 0


async def test_a_cancelled_background_item_leaves_its_queue(make_batcher, engine):
    batcher = await make_batcher()
    engine.gate.clear()
    busy = asyncio.create_task(batcher.submit(row(1), deadline=later()))
    await engine.wait_entered()
    waiting = asyncio.create_task(batcher.submit(row(2), deadline=later(), background=True))
    await asyncio.sleep(0)
    waiting.cancel()
    engine.gate.set()
    await asyncio.wait_for(busy, 30)
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert await asyncio.wait_for(batcher.submit(row(3), deadline=later()), 30) is not None
    assert engine.seen() == [1.0, 3.0]


async def test_an_overdue_background_item_runs_between_live_ones(make_batcher, engine):
    """Under unbroken live load a background item still gets its turn once it has waited its bound."""
    batcher = await make_batcher(max_wait_ms=0, background_max_wait_s=0.0)
    engine.gate.clear()
    busy = asyncio.create_task(batcher.submit(row(1), deadline=later()))
    await engine.wait_entered()
    background = asyncio.create_task(batcher.submit(row(10), deadline=later(), background=True))
    await asyncio.sleep(0)
    live = asyncio.create_task(batcher.submit(row(100), deadline=later()))
    await wait_until(lambda: batcher.depth == 1, "the live item queued")
    engine.gate.set()
    await asyncio.wait_for(asyncio.gather(busy, background, live), 30)
    assert [float(call.sum()) for call in engine.calls] == [1.0, 10.0, 100.0]  # overdue: before the live one
