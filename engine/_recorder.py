"""The journal/event part of the engine: every store write about a job, announced to its watchers.

:class:`Recorder` writes (shielded from cancellation: a write that starts
also finishes and is announced) and publishes the resulting events to
subscribers; :class:`JobBackend` is the same bound to one job, the engine
side of a workflow's ``ctx.journal`` (:class:`engine._seam.JobRecord`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from ._context import Context
from ._jobs import ErrorInfo, Event, JobState, Step, StepState
from ._inventory import InventoryChange
from ._locks import LockRequest
from ._ops import Operation
from ._store import Store


@dataclass(eq=False)
class JobHandle:
    """In-memory companion of a non-final job this engine is driving."""

    id: int
    op: Operation
    state: JobState
    priority: int
    depends_on: tuple[int, ...] = ()
    parent_id: int | None = None
    locks: list[LockRequest] = field(default_factory=list)
    migration_nodes: tuple[str, ...] = ()
    granted: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope | None = None
    cancel_reason: str | None = None
    ponr: str | None = None
    recovering: bool = False
    children: set[int] = field(default_factory=set)
    ctx: Context | None = None
    progress_wake: anyio.Event = field(default_factory=anyio.Event)


async def shielded(coro: Any) -> Any:
    """Await ``coro`` shielded from cancellation (a write that starts, finishes)."""
    with anyio.CancelScope(shield=True):
        return await coro


class Recorder:
    """Store writes about jobs and the cluster, each published to the subscribers."""

    def __init__(self, store: Store, clock: Callable[[], float], log: Any) -> None:
        self.store = store
        self.clock = clock
        self.log = log
        self.subscribers: dict[int | None, set[MemoryObjectSendStream[Event]]] = {}

    def publish(self, event: Event) -> None:
        for send in list(self.subscribers.get(event.job_id, ())):
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                send.send_nowait(event)

    def close_subscribers(self) -> None:
        for subs in self.subscribers.values():
            for send in list(subs):
                send.close()

    async def add_event(self, job_id: int | None, kind: str, data: dict[str, Any]) -> None:
        self.publish(await shielded(self.store.add_event(job_id, kind, data, now=self.clock())))

    async def transition(self, h: JobHandle, states: Sequence[JobState], *, data: dict[str, Any] | None = None) -> None:
        events = await shielded(self.store.transition(h.id, states, now=self.clock(), data=data))
        h.state = states[-1]
        for ev in events:
            self.publish(ev)
        self.log.info("job state", job_id=h.id, op=h.op.kind, state=h.state.value)

    async def finish(self, h: JobHandle, state: JobState, *, result: Any = None, error: ErrorInfo | None = None) -> None:
        events = await shielded(self.store.transition(h.id, [state], now=self.clock(), result=result, error=error))
        h.state = state
        for ev in events:
            self.publish(ev)
        log = self.log.bind(job_id=h.id, op=h.op.kind, state=state.value)
        if error is not None:
            log.warning("job finished", error=str(error))
        else:
            log.info("job finished")


class JobBackend:
    """The engine side of one job's journal (implements :class:`engine._seam.JobRecord`)."""

    def __init__(self, recorder: Recorder, handle: JobHandle, log: Any, on_inventory_change: Callable[[], None]) -> None:
        self._rec = recorder
        self._handle = handle
        self._log = log
        self._on_inventory_change = on_inventory_change

    @property
    def job_id(self) -> int:
        return self._handle.id

    @property
    def op(self) -> Operation:
        return self._handle.op

    @property
    def cancel_reason(self) -> str | None:
        return self._handle.cancel_reason

    @property
    def ponr(self) -> str | None:
        return self._handle.ponr

    async def step_start(self, *, name: str, node: str | None, method: str | None, args: str, deadline: float | None) -> Step:
        store = self._rec.store
        step, event = await shielded(
            store.step_start(self.job_id, name=name, node=node, method=method, args=args, deadline=deadline, now=self._rec.clock())
        )
        self._rec.publish(event)
        return step

    async def step_end(
        self, step: Step, *, state: StepState, result: Any = None, error: ErrorInfo | None = None,
        attempts: int = 1, inventory: Sequence[InventoryChange] = (),
    ) -> None:
        now = self._rec.clock()
        try:
            event = await shielded(
                self._rec.store.step_end(self.job_id, step.idx, state=state, now=now, result=result, error=error, attempts=attempts, inventory=inventory)
            )
        finally:
            if inventory:
                self._on_inventory_change()
        step.state, step.ended_at, step.result, step.error, step.attempts = state, now, result, error, attempts
        self._rec.publish(event)

    async def add_event(self, kind: str, data: dict[str, Any]) -> None:
        await self._rec.add_event(self.job_id, kind, data)

    async def set_ponr(self, reason: str) -> None:
        self._handle.ponr = reason
        self._rec.publish(await shielded(self._rec.store.set_point_of_no_return(self.job_id, reason, now=self._rec.clock())))
        self._log.info("point of no return", reason=reason)

    def progress_pending(self) -> None:
        self._handle.progress_wake.set()
