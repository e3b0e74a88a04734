"""SingleFlight and Backoff, the label cache's generic parts, on their own (the cache's tests cover the rest)."""

from __future__ import annotations

import asyncio

import pytest

from service.labels.backoff import Backoff
from service.labels.single_flight import SingleFlight


async def test_a_computation_that_forgets_a_key_fails_its_callers_instead_of_hanging() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    calls: list[list[str]] = []

    async def forgetful(keys: list[str]) -> dict[str, int]:
        calls.append(keys)
        return {"a": 1}

    with pytest.raises(KeyError, match="'b'"):
        await asyncio.wait_for(flight.get(["a", "b"], forgetful), timeout=30)

    async def complete(keys: list[str]) -> dict[str, int]:
        calls.append(keys)
        return dict.fromkeys(keys, 2)

    assert await flight.get(["b"], complete) == {"b": 2}  # not poisoned: computed afresh
    assert calls == [["a", "b"], ["b"]] and await flight.get([], complete) == {}


async def test_close_cancels_computations_in_flight() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def endless(keys: list[str]) -> dict[str, int]:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return {}

    caller = asyncio.create_task(flight.get(["k"], endless))
    await started.wait()
    await flight.close()
    assert cancelled.is_set()
    with pytest.raises(asyncio.CancelledError):
        await caller


def test_backoff_doubles_to_its_cap_and_resets_on_success() -> None:
    now = [0.0]
    backoff = Backoff(1, 4, clock=lambda: now[0])
    assert backoff.open and [backoff.failed() for _ in range(4)] == [1, 2, 4, 4]
    assert not backoff.open
    now[0] += 4
    assert backoff.open
    backoff.succeeded()
    assert backoff.failed() == 1
    with pytest.raises(ValueError):
        Backoff(2, 1)
