"""Job records: states, steps, events, errors — plain typed data.

These are what the store persists and what the API hands out. The store is
the source of truth; the engine keeps these in memory only as a cache of
what it has already written.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec


class JobState(str, enum.Enum):
    """``queued → waiting → running → succeeded | failed | cancelled``.

    ``cancelling`` sits between ``running`` and ``cancelled`` while the
    workflow's compensation runs.
    """

    QUEUED = "queued"  # accepted; waiting for its dependencies
    WAITING = "waiting"  # waiting for locks / a run slot
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in _FINAL

    @property
    def pending(self) -> bool:
        """Not yet started: cancelling it is immediate."""
        return self in (JobState.QUEUED, JobState.WAITING)

    @property
    def active(self) -> bool:
        """A workflow (or its compensation/recovery) may be acting on nodes."""
        return self in (JobState.RUNNING, JobState.CANCELLING)


_FINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

#: Allowed transitions; anything else is a bug and is refused by the store.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.WAITING, JobState.CANCELLED, JobState.FAILED}),
    JobState.WAITING: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED, JobState.QUEUED}),
    JobState.RUNNING: frozenset({JobState.CANCELLING, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}),
    JobState.CANCELLING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class StepState(str, enum.Enum):
    RUNNING = "running"  # started (journaled before the call); no end recorded
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed-out"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self is not StepState.RUNNING


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True):
    """An exception as recorded: class name (and its bases), message, where."""

    type: str
    message: str
    node: str | None = None
    step: str | None = None
    classes: tuple[str, ...] = ()

    @classmethod
    def from_exception(cls, exc: BaseException, *, step: str | None = None, node: str | None = None) -> ErrorInfo:
        # A group of one (a workflow's own task group) is recorded as its member.
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        names = tuple(k.__name__ for k in type(exc).__mro__ if k not in (object, BaseException, Exception))
        return cls(
            type=type(exc).__name__,
            message=str(exc) or type(exc).__name__,
            node=getattr(exc, "node", None) or node,
            step=getattr(exc, "step", None) or step,
            classes=names,
        )

    def is_a(self, name: str) -> bool:
        """Whether the recorded exception was (a subclass of) class ``name``."""
        return name == self.type or name in self.classes

    def __str__(self) -> str:
        where = []
        if self.step:
            where.append(f"step {self.step}")
        if self.node:
            where.append(f"node {self.node}")
        prefix = f"[{', '.join(where)}] " if where else ""
        return f"{prefix}{self.type}: {self.message}"


class Step(msgspec.Struct, kw_only=True):
    """One journaled step: written when it starts, updated when it ends."""

    job_id: int
    idx: int
    name: str
    node: str | None = None
    method: str | None = None
    args: str = ""  # a short summary, never secrets
    state: StepState = StepState.RUNNING
    started_at: float = 0.0
    ended_at: float | None = None
    deadline: float | None = None  # seconds allowed
    attempts: int = 1
    result: Any = None
    error: ErrorInfo | None = None


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """Something that happened, with a wall-clock timestamp.

    ``seq`` is global and increasing (the store's order); ``job_id`` is None
    for cluster events (a node going offline). ``kind`` is e.g. ``state``,
    ``step-start``, ``step-end``, ``progress``, ``cancel-requested``, ``log``.
    """

    seq: int
    job_id: int | None
    ts: float
    kind: str
    data: dict[str, Any] = msgspec.field(default_factory=dict)


class Job(msgspec.Struct, kw_only=True):
    """A job as the store has it."""

    id: int
    kind: str
    op: Any  # the typed operation (an engine._ops.Operation)
    state: JobState
    priority: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    result: Any = None
    error: ErrorInfo | None = None
    cancel_reason: str | None = None
    point_of_no_return: str | None = None
    parent_id: int | None = None
    depends_on: tuple[int, ...] = ()
    recovery: str | None = None  # why recovery is still pending, when it is
    steps: list[Step] = msgspec.field(default_factory=list)

    @property
    def final(self) -> bool:
        return self.state.final
