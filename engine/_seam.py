"""The seam between the engine and the workflows: what each side needs of the other.

Workflows never see the :class:`~engine.Engine`. They get a
:class:`~engine.Context` made of small collaborators (``ctx.journal``,
``ctx.nodes``, ``ctx.inventory``, ``ctx.jobs``, ``ctx.policy``,
``ctx.clock``, ``ctx.rng``); this module declares what the engine must
provide behind them, as Protocols, so that the engine composes concrete
implementations and the workflow side imports nothing of the engine.
Nothing here imports ``engine._engine`` (and nothing must).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from ._inventory import InstanceRecord, InventoryChange
from ._jobs import ErrorInfo, Event, Job, JobState, Step, StepState
from ._ops import Operation
from ._policy import DEFAULT_POLICY, MigrationPolicy


class Clock(Protocol):
    """Time for workflows: ``now()`` wall time for timestamps, ``monotonic()`` for deadlines."""

    def now(self) -> float: ...

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The default :class:`Clock`: a wall clock (``time.time`` unless given) and anyio's clock."""

    def __init__(self, wall: Callable[[], float] | None = None) -> None:
        self._wall = wall or time.time

    def now(self) -> float:
        return self._wall()

    def monotonic(self) -> float:
        return anyio.current_time()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


@dataclass(frozen=True)
class ClusterPolicy:
    """Cluster-wide defaults a workflow may read (``ctx.policy``)."""

    #: The migration policy an operation's own ``policy`` overrides field by field.
    migration: MigrationPolicy = field(default_factory=lambda: DEFAULT_POLICY)


class Inventory(Protocol):
    """The inventory as a workflow reads it (``ctx.inventory``); changes go through journal steps."""

    async def instance(self, name: str) -> InstanceRecord: ...

    async def all(self) -> dict[str, InstanceRecord]: ...


class Jobs(Protocol):
    """Other jobs, as a workflow that fans out (EvacuateNode) needs them (``ctx.jobs``)."""

    async def submit_child(self, op: Operation, *, priority: int | None = None) -> int: ...

    async def wait(self, job_id: int) -> Job: ...

    async def get(self, job_id: int) -> Job: ...

    async def children(self) -> list[Job]: ...


class JobRecord(Protocol):
    """The engine side of one job's journal: the store writes, bound to the job."""

    @property
    def job_id(self) -> int: ...

    @property
    def op(self) -> Operation: ...

    @property
    def cancel_reason(self) -> str | None: ...

    @property
    def ponr(self) -> str | None: ...

    async def step_start(self, *, name: str, node: str | None, method: str | None, args: str, deadline: float | None) -> Step: ...

    async def step_end(
        self, step: Step, *, state: StepState, result: Any = None, error: ErrorInfo | None = None,
        attempts: int = 1, inventory: Sequence[InventoryChange] = (),
    ) -> None: ...

    async def add_event(self, kind: str, data: dict[str, Any]) -> None: ...

    async def set_ponr(self, reason: str) -> None: ...

    def progress_pending(self) -> None: ...


class NodeLink(Protocol):
    """The engine side of the nodes: one raw call, health, names, addresses."""

    @property
    def names(self) -> list[str]: ...

    def online(self, name: str) -> bool: ...

    def address(self, name: str) -> str: ...

    async def call(
        self, node: str, method: str, args: Sequence[Any], kwargs: Mapping[str, Any], *,
        on_progress: Callable[[dict[str, Any]], None] | None, fail_fast: bool = True,
    ) -> Any: ...

    async def mark_unreachable(self, node: str, error: BaseException) -> None: ...


class ServiceHost(Protocol):
    """What an engine service (the pending-cleanup janitor) may use of the engine."""

    log: Any

    @property
    def node_names(self) -> list[str]: ...

    def node_online(self, name: str) -> bool: ...

    async def instances(self) -> dict[str, InstanceRecord]: ...

    async def list(self, state: JobState | Sequence[JobState] | None = None, *, limit: int | None = None) -> list[Job]: ...

    async def submit(self, op: Operation, *, priority: int = 0) -> int: ...

    def watch_cluster(self) -> AsyncIterator[Event]: ...


class ServiceView:
    """The :class:`ServiceHost` a service is given: only those names of the engine, not the engine."""

    def __init__(self, host: ServiceHost) -> None:
        self._host = host
        self.log = host.log

    @property
    def node_names(self) -> list[str]:
        return self._host.node_names

    def node_online(self, name: str) -> bool:
        return self._host.node_online(name)

    async def instances(self) -> dict[str, InstanceRecord]:
        return await self._host.instances()

    async def list(self, state: JobState | Sequence[JobState] | None = None, *, limit: int | None = None) -> list[Job]:
        return await self._host.list(state, limit=limit)

    async def submit(self, op: Operation, *, priority: int = 0) -> int:
        return await self._host.submit(op, priority=priority)

    def watch_cluster(self) -> AsyncIterator[Event]:
        return self._host.watch_cluster()


#: An engine service: ``async fn(host)`` run by the owner engine from open to close.
Service = Callable[[ServiceHost], Awaitable[None]]
