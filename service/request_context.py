"""The request a task is serving: its id, the engine batches it rode in and where its time went.

Bound by `service.request_log.RequestLogMiddleware` at the start of each request. Error bodies read the id, and the
batchers and pipeline stages add batch sizes and stage times from inside the request's own task, so none of them
needs the request passed down to it. The stage times go out in the `Server-Timing` response header.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from dataclasses import dataclass, field


@dataclass
class ServedRequest:
    id: str
    batch_sizes: dict[str, int] = field(default_factory=dict)  # batcher name -> largest engine batch
    stage_ms: dict[str, float] = field(default_factory=dict)  # stage -> milliseconds spent in it, in stage order


_current: ContextVar[ServedRequest | None] = ContextVar("clipserve_request", default=None)


def current_id() -> str | None:
    """The id of the request being served by this task, or None outside a request."""
    request = _current.get()
    return request.id if request is not None else None


def note_batch(batcher: str, rows: int) -> None:
    """Records that this request's work ran in an engine batch of `rows` rows."""
    request = _current.get()
    if request is not None:
        request.batch_sizes[batcher] = max(rows, request.batch_sizes.get(batcher, 0))


def note_time(stage: str, ms: float) -> None:
    """Adds `ms` to this request's time in `stage` (a request with several images or engine calls adds up). Only
    from the request's own task: executor threads do not see the request's context."""
    request = _current.get()
    if request is not None:
        request.stage_ms[stage] = request.stage_ms.get(stage, 0.0) + ms


def bind(request: ServedRequest) -> Token[ServedRequest | None]:
    return _current.set(request)
