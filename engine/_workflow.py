"""Workflows: what a job does, step by step, and how it undoes or recovers.

A workflow is a class for one operation kind, named in the engine's table
(:data:`engine.workflows.BUILTIN_WORKFLOWS`, extended per engine)::

    class StopWorkflow(Workflow[StopInstance]):
        OP = StopInstance
        async def run(self, ctx): ...            # the forward path; returns the result (JSON-able)
        async def compensate(self, ctx, reason): ...  # undo after a cancel/failure (runs shielded)
        async def recover(self, ctx): ...        # after an engine crash: read journal + nodes → Outcome

Every remote action goes through ``ctx.nodes.call(node, ...)``, which
journals the step *before* acting, applies the deadline, retries idempotent
reads, and records the end (with any inventory change, in the same
transaction). See :mod:`engine._context`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from ._context import Context
from ._jobs import JobState
from ._ops import Operation
from .errors import EngineError, InvalidOperation

OpT = TypeVar("OpT", bound=Operation)


def check_workflows(table: Mapping[str, type[Workflow[Any]]]) -> dict[str, type[Workflow[Any]]]:
    """A workflow table, checked: each kind names a Workflow whose ``OP`` has that kind."""
    checked: dict[str, type[Workflow[Any]]] = {}
    for kind, cls in table.items():
        if not (isinstance(cls, type) and issubclass(cls, Workflow)):
            raise TypeError(f"workflows[{kind!r}]: {cls!r} is not a Workflow class")
        op = getattr(cls, "OP", None)
        if not (isinstance(op, type) and issubclass(op, Operation)):
            raise TypeError(f"workflows[{kind!r}]: {cls.__name__}.OP must be its Operation class")
        if str(op.__struct_config__.tag) != kind:
            raise TypeError(f"workflows[{kind!r}]: {cls.__name__}.OP is {op.__name__}, of kind {op.__struct_config__.tag!r}")
        checked[kind] = cls
    return checked


def workflow_for(table: Mapping[str, type[Workflow[Any]]], kind: str) -> type[Workflow[Any]]:
    """The workflow class for ``kind`` in ``table`` (InvalidOperation when there is none)."""
    try:
        return table[kind]
    except KeyError:
        raise InvalidOperation(f"no workflow for operation kind {kind!r} in this engine") from None


@dataclass
class Outcome:
    """How :meth:`Workflow.recover` settles a job."""

    state: JobState
    result: Any = None
    error: BaseException | None = None

    @classmethod
    def succeeded(cls, result: Any = None) -> Outcome:
        return cls(JobState.SUCCEEDED, result)

    @classmethod
    def failed(cls, error: BaseException, result: Any = None) -> Outcome:
        return cls(JobState.FAILED, result, error)

    @classmethod
    def cancelled(cls, reason: str, result: Any = None) -> Outcome:
        from .errors import JobCancelled

        return cls(JobState.CANCELLED, result, JobCancelled(f"cancelled: {reason}"))


class Workflow(Generic[OpT]):
    """Base class: override :meth:`run`, :meth:`compensate`, :meth:`recover`."""

    OP: ClassVar[type[Operation]]
    #: Seconds compensation may take (it runs shielded from cancellation).
    COMPENSATION_TIMEOUT: ClassVar[float] = 120.0

    def __init__(self, op: OpT) -> None:
        self.op = op

    async def run(self, ctx: Context) -> Any:
        raise NotImplementedError

    async def compensate(self, ctx: Context, reason: str) -> None:
        """Undo what :meth:`run` did after a cancel or a failure (default: nothing)."""
        return None

    async def recover(self, ctx: Context) -> Outcome:
        """Settle a job found running after a crash (default: fail, honestly)."""
        return Outcome.failed(EngineError(f"{self.op.kind} has no recovery: the engine stopped while it ran"))


__all__ = ["Context", "Outcome", "Workflow", "check_workflows", "workflow_for"]
