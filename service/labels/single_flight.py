"""Single-flight: concurrent calls that need the same keys share one computation per key.

A call registers a future for each key nobody is computing yet and starts one task that computes them all;
keys already in flight are only waited for. The computation runs in its own task, so one caller going away
(its request timed out, its client disconnected) does not cancel it for the others; when nobody waits for
any of a task's keys any more, the task is cancelled instead of occupying the text engine for everyone else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def _retrieve(future: asyncio.Future[Any]) -> None:
    # Marks a failure as seen when every caller waiting on it was cancelled (no "never retrieved" noise).
    if not future.cancelled():
        future.exception()


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._inflight: dict[K, asyncio.Future[V]] = {}
        self._waiters: dict[K, int] = {}  # how many calls still want each key
        self._task_keys: dict[asyncio.Task[None], list[K]] = {}  # also the strong references to the tasks

    async def get(self, keys: Sequence[K], compute: Callable[[list[K]], Awaitable[dict[K, V]]]) -> dict[K, V]:
        """The value of every key in `keys` (distinct). `compute(owned)` is called for the keys no other call is
        computing and must return a value for each of them; it should store them where the next caller looks
        first (the memory tier) before returning, since the key stops being in flight as soon as it returns."""
        waiting: dict[K, asyncio.Future[V]] = {}
        owned: list[K] = []
        for key in keys:  # no await in this loop: one owner per key
            future = self._inflight.get(key)
            if future is None:
                future = asyncio.get_running_loop().create_future()
                future.add_done_callback(_retrieve)
                self._inflight[key] = future
                owned.append(key)
            waiting[key] = future
        if owned:
            task = asyncio.create_task(self._compute(owned, compute))
            self._task_keys[task] = owned
            task.add_done_callback(self._task_keys.pop)
        if not waiting:
            return {}
        gathered = asyncio.gather(*waiting.values())
        gathered.add_done_callback(_retrieve)
        for key in waiting:
            self._waiters[key] = self._waiters.get(key, 0) + 1
        try:
            return dict(zip(waiting, await asyncio.shield(gathered), strict=True))
        finally:
            self._stop_waiting(list(waiting))

    async def close(self) -> None:
        tasks = list(self._task_keys)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _stop_waiting(self, keys: list[K]) -> None:
        for key in keys:
            remaining = self._waiters.get(key, 1) - 1
            if remaining > 0:
                self._waiters[key] = remaining
            else:
                self._waiters.pop(key, None)
        for task, task_keys in list(self._task_keys.items()):
            if not task.done() and not any(self._waiters.get(key, 0) for key in task_keys):
                task.cancel()
                # The cancellation lands on a later loop turn: a call arriving before then must start afresh,
                # not join a computation that is about to end in CancelledError.
                for key in task_keys:
                    self._inflight.pop(key, None)

    async def _compute(self, keys: list[K], compute: Callable[[list[K]], Awaitable[dict[K, V]]]) -> None:
        futures = {key: self._inflight[key] for key in keys}
        try:
            values = await compute(keys)
        except BaseException as error:
            for key, future in futures.items():
                self._release(key, future)  # not poisoned: the next call for this key starts afresh
                if future.done():
                    continue
                if isinstance(error, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(error)
            if not isinstance(error, Exception):
                raise
            return
        for key, future in futures.items():  # no await in this loop: results and in-flight keys agree
            self._release(key, future)
            if future.done():
                continue
            if key in values:
                future.set_result(values[key])
            else:  # a broken `compute`: its callers get an error rather than a wait without end
                future.set_exception(KeyError(f"the computation returned no value for {key!r}"))

    def _release(self, key: K, future: asyncio.Future[V]) -> None:
        # Only our own entry: a cancelled computation's key may already belong to a newer one.
        if self._inflight.get(key) is future:
            del self._inflight[key]
