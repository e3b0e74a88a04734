"""Dynamic batching: many concurrent requests, few engine calls.

`submit` queues one item (rows [n, ...]) with its own future. One worker task takes items in arrival order,
joins them into a batch of at most `max_batch_size` rows, waits at most `max_wait_ms` for more to arrive,
runs the blocking engine in a thread and hands each item back its own rows of the output.

The output is anything with a length in rows and row slicing: a host array, or a DeviceArray when the engine
leaves embeddings on the GPU (service/gpu), which is sliced without a copy.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service import request_context
from service.errors import DeadlineExceeded, NotReady, Overloaded, ServiceError
from service.metrics import Metrics

log = logging.getLogger("clipserve.batcher")


@dataclass(eq=False)
class _Item:
    rows: np.ndarray
    deadline: float  # time.monotonic()
    future: asyncio.Future[Any]
    submitted: float = field(default_factory=time.monotonic)
    queued: bool = True  # still in a queue (live items there count in `depth`)
    background: bool = False
    engine_rows: int = 0  # rows of the engine call that ran it, for the request's log line
    taken: float = 0.0  # time.monotonic() when the worker took it into a batch
    engine_ms: float = 0.0  # the engine call(s) that ran it, for the request's Server-Timing


def _row_count(output: Any) -> int | str:
    if isinstance(output, np.ndarray):
        return len(output) if output.ndim else "no"
    shape = getattr(output, "shape", None)
    return shape[0] if isinstance(shape, tuple) and shape else "no"


class _Abandoned(Exception):
    """Nobody waits for the rest of a multi-chunk batch any more."""


class DynamicBatcher:
    def __init__(
        self,
        name: str,
        run: Callable[[np.ndarray], Any],  # rows -> an output of as many rows (np.ndarray or DeviceArray)
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        metrics: Metrics,
        background_max_wait_s: float = 5.0,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait_ms >= 0")
        self.name, self._run, self._metrics = name, run, metrics
        self.background_max_wait_s = background_max_wait_s
        self.max_batch_size, self.max_queue, self._max_wait_s = max_batch_size, max_queue, max_wait_ms / 1000
        # One thread of our own: engine calls stay off the event loop and never overlap.
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"batcher-{name}")
        self._queue: deque[_Item] = deque()
        # Work no request waits for (preparing a saved classifier): taken only when no live item waits, one item
        # per engine call, and not counted against max_queue (its producer submits one item at a time).
        self._background: deque[_Item] = deque()
        self._depth = 0
        self._arrived = asyncio.Event()
        self._batch: list[_Item] = []  # the worker's current batch; stop() fails it unless the engine has it
        self._in_engine = False
        self._worker: asyncio.Task[None] | None = None
        self._stopping = False
        metrics.queue_depth.labels(name).set(0)

    @property
    def depth(self) -> int:
        """Rows waiting in the queue (taken items no longer count)."""
        return self._depth

    async def start(self) -> None:
        if self._stopping:
            raise RuntimeError(f"the {self.name} batcher was stopped; build a new one")
        if self._worker is None:
            self._worker = asyncio.create_task(self._serve(), name=f"clipserve-batcher-{self.name}")

    async def stop(self) -> None:
        """Refuse new items and fail the waiting ones with NotReady; an engine call in flight completes."""
        self._abandon(in_engine_too=False)
        self._arrived.set()
        if self._worker is not None:
            await asyncio.wait({self._worker})  # not `await task`: a worker cancelled elsewhere must not raise here
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, rows: np.ndarray, *, deadline: float, background: bool = False) -> Any:
        """Queue `rows` [n, ...] and return the engine's output rows for them, aligned one for one. A background
        item runs only when no live item is waiting, so it should hold at most `max_batch_size` rows."""
        if self._worker is None or self._stopping:
            raise NotReady(f"the {self.name} batcher is not running")
        if rows.ndim == 0 or len(rows) == 0:
            raise ValueError("rows must have shape [n, ...] with n >= 1")
        if deadline <= time.monotonic():
            self._metrics.rejected.labels(self.name, "deadline").inc()
            raise DeadlineExceeded(f"the {self.name} request reached its deadline before it was queued")
        # Bounded in rows, the unit of engine work. An item bigger than the whole bound is still accepted on an
        # empty queue: refusing it would make it unservable forever, and it waits behind nobody.
        if not background and self._depth and self._depth + len(rows) > self.max_queue:
            self._metrics.rejected.labels(self.name, "queue_full").inc()
            raise Overloaded(f"the {self.name} queue is full ({self._depth} of {self.max_queue} rows waiting)")
        item = _Item(rows, deadline, asyncio.get_running_loop().create_future(), background=background)
        if background:
            self._background.append(item)
        else:
            self._queue.append(item)
            self._set_depth(self._depth + len(rows))
        self._arrived.set()
        try:
            done, _ = await asyncio.wait({item.future}, timeout=deadline - time.monotonic())
        except asyncio.CancelledError:  # the client went away: give the slot back
            self._withdraw(item, "cancelled")
            raise
        if not done:
            self._withdraw(item, "deadline")
            raise DeadlineExceeded(f"the {self.name} request did not finish before its deadline")
        request_context.note_batch(self.name, item.engine_rows)
        request_context.note_time(f"{self.name}_queue", (item.taken - item.submitted) * 1000)
        request_context.note_time(f"{self.name}_engine", item.engine_ms)
        return item.future.result()

    async def _serve(self) -> None:
        try:
            while not self._stopping:
                batch = await self._collect()
                try:
                    await self._run_batch(batch)
                except Exception:  # a bug here must not kill the worker and hang every later request
                    log.exception("%s batcher failed on a batch", self.name)
                    for item in batch:
                        self._fail(item, ServiceError(f"the {self.name} batcher failed; see the server log"), None)
        finally:  # also when cancelled from outside: nobody may wait on a future that no worker will complete
            self._abandon(in_engine_too=True)

    async def _collect(self) -> list[_Item]:
        batch: list[_Item] = []
        self._batch, self._in_engine = batch, False
        while not batch:
            while not self._queue and not self._background:
                if self._stopping:
                    return batch
                self._arrived.clear()
                await self._arrived.wait()
            if not self._queue or self._background_overdue():
                self._take_head(batch, self._background)
                return batch  # alone: live items arriving meanwhile wait one engine call at most
            self._take_head(batch, self._queue)
        first = batch[0].rows
        rows = len(first)
        if not self._queue:
            # A lone item goes at once: nobody is queued behind it, and the engine is idle (the one worker is
            # here), so waiting could only add max_wait_ms to its latency. Measured on CPU (demo model and
            # ViT-B-32): p50 at concurrency 1 fell by the whole window, throughput at 8 and 32 did not drop,
            # because under load the items that arrive during an engine call are all taken by the next batch.
            return batch
        window_end = time.monotonic() + self._max_wait_s  # the wait counts from taking the first item
        while rows < self.max_batch_size and not self._stopping:
            if not self._queue:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), window_end - time.monotonic())
                except TimeoutError:
                    break
                continue
            head = self._queue[0].rows
            # FIFO: a head that does not fit (too many rows, or a shape/dtype it cannot be stacked with) waits
            # for the next batch, and so would everything behind it; waiting longer cannot add anything.
            if head.shape[1:] != first.shape[1:] or head.dtype != first.dtype or rows + len(head) > self.max_batch_size:
                break
            rows += self._take_head(batch, self._queue)
        return batch

    def _background_overdue(self) -> bool:
        """Whether the oldest background item has waited past its bound: under unbroken live load it still runs,
        one engine call at a time, instead of waiting for ever."""
        return bool(self._background) and time.monotonic() - self._background[0].submitted > self.background_max_wait_s

    def _take_head(self, batch: list[_Item], queue: deque[_Item]) -> int:
        """Move the head item of `queue` into `batch` (or drop it if its deadline passed); return the rows added."""
        item = queue.popleft()
        item.queued = False
        if not item.background:
            self._set_depth(self._depth - len(item.rows))
        now = item.taken = time.monotonic()
        # Background waits are their own series: they are long by design and would hide the live ones.
        lane = f"{self.name}-background" if item.background else self.name
        self._metrics.queue_wait_seconds.labels(lane).observe(now - item.submitted)
        if now >= item.deadline:
            self._fail(item, DeadlineExceeded(f"the {self.name} request expired in the queue"), "deadline")
            return 0
        batch.append(item)
        return len(item.rows)

    async def _run_batch(self, batch: list[_Item]) -> None:
        live = [item for item in batch if not item.future.done()]  # skip items cancelled while collected
        if not live:
            return
        self._in_engine = True
        inputs = live[0].rows if len(live) == 1 else np.concatenate([item.rows for item in live])
        try:
            outputs = await self._call_engine(inputs, live)
        except _Abandoned:
            self._metrics.rejected.labels(self.name, "abandoned").inc()
            return
        except Exception as error:
            log.warning("%s engine failed on %d rows: %r", self.name, len(inputs), error)
            for item in live:
                self._fail(item, error, None)
            return
        start = 0
        for item in live:
            item.engine_rows = min(len(inputs), self.max_batch_size)
            stop = start + len(item.rows)
            if not item.future.done():  # its caller may have timed out or gone away meanwhile
                item.future.set_result(outputs[start:stop])
            start = stop

    async def _call_engine(self, inputs: np.ndarray, items: list[_Item]) -> Any:
        # Only an item bigger than max_batch_size needs more than one call.
        loop = asyncio.get_running_loop()
        parts = []
        engine_s = 0.0
        for start in range(0, len(inputs), self.max_batch_size):
            if start and all(item.future.done() for item in items):
                # Every caller has gone (cancelled or timed out): the remaining chunks would only delay others.
                raise _Abandoned
            chunk = inputs[start : start + self.max_batch_size]
            self._metrics.batch_size.labels(self.name).observe(len(chunk))
            began = time.perf_counter()
            try:
                output = await loop.run_in_executor(self._executor, self._run, chunk)
            finally:
                elapsed = time.perf_counter() - began
                engine_s += elapsed
                self._metrics.engine_seconds.labels(self.name).observe(elapsed)
            # A short output would shift every later caller onto someone else's rows: refuse it outright.
            got = _row_count(output)
            if got != len(chunk):
                raise ServiceError(f"the {self.name} engine returned {got} rows for {len(chunk)} inputs")
            parts.append(output)
        for item in items:
            item.engine_ms = engine_s * 1000
        if len(parts) == 1:
            return parts[0]
        if not all(isinstance(part, np.ndarray) for part in parts):
            # Device outputs are not joined here; callers submit at most max_batch_size rows at a time instead.
            raise ServiceError(f"the {self.name} engine's device outputs cannot span several engine calls")
        return np.concatenate(parts)

    def _abandon(self, *, in_engine_too: bool) -> None:
        """Stop accepting items and fail every waiting one with NotReady."""
        self._stopping = True
        # NotReady, not Overloaded: this instance is going away, so a retry belongs on another one.
        stopped = NotReady(f"the {self.name} batcher is shutting down")
        waiting = [*self._queue, *self._background, *(self._batch if in_engine_too or not self._in_engine else [])]
        self._queue.clear()
        self._background.clear()
        self._set_depth(0)
        for item in waiting:
            item.queued = False
            self._fail(item, stopped, "stopped")

    def _withdraw(self, item: _Item, reason: str) -> None:
        """The caller stopped waiting: release the item's queue slot so the engine never sees it."""
        if item.future.done():
            return
        item.future.cancel()
        if item.queued:
            item.queued = False
            if item.background:
                self._background.remove(item)
            else:
                self._queue.remove(item)
                self._set_depth(self._depth - len(item.rows))
        self._metrics.rejected.labels(self.name, reason).inc()

    def _fail(self, item: _Item, error: BaseException, reason: str | None) -> None:
        if item.future.done():
            return
        item.future.set_exception(error)
        if reason:
            self._metrics.rejected.labels(self.name, reason).inc()

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        self._metrics.queue_depth.labels(self.name).set(depth)
