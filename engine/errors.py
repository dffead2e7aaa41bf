"""The engine's error tree (root :class:`EngineError`).

Errors are also *recorded*: a job's ``error`` is a :class:`ErrorInfo` built
from the exception (its class name, message, node, step), so a reader of the
store can tell a timeout from an unreachable node without the Python objects.
"""

from __future__ import annotations

from typing import Any

from transport.errors import NodeUnreachable

#: The longest echo of an input value in an error message (characters).
ECHO_LIMIT = 80


def shorten(value: Any, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters.

    Every error that echoes input uses it, so a 10 KB value makes a short
    line (``'aaaa…' (10240 characters)``) that still says how long it was;
    ``repr`` also keeps a newline in a name from breaking the line.
    """
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, str) else f"{len(text)} characters as text"
    return f"{text[: max(limit - 1, 1)]}… ({size})"


class EngineError(Exception):
    """Root of every error the engine raises itself."""

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return self.message


class InvalidOperation(EngineError, ValueError):
    """An operation failed validation at submit time (it was never stored)."""


class JobNotFound(EngineError, LookupError):
    """No job with that id exists in the store."""


class InstanceNotKnown(EngineError, LookupError):
    """The inventory has no instance of that name."""


class StoreError(EngineError):
    """The store is unusable: wrong schema version, corrupt row, closed."""


class StepFailed(EngineError):
    """A workflow step failed; names the step, node and the cause."""

    def __init__(self, message: str, *, step: str | None = None, node: str | None = None, cause: str | None = None) -> None:
        super().__init__(message, step=step, node=node, cause=cause)
        self.step = step
        self.node = node
        self.cause = cause


class StepTimeout(StepFailed, TimeoutError):
    """A step ran past its deadline (it was cancelled on the node)."""

    def __init__(self, message: str, *, step: str | None = None, node: str | None = None, deadline: float | None = None) -> None:
        super().__init__(message, step=step, node=node, cause="timeout")
        self.deadline = deadline


class StepUnreachable(StepFailed, NodeUnreachable):
    """An idempotent step found its node unreachable on every attempt until its deadline.

    A :class:`transport.errors.NodeUnreachable` too: the engine marks the
    node offline (later jobs fail fast) and callers handle it as unreachable.
    """

    def __init__(self, message: str, *, step: str | None = None, node: str | None = None, deadline: float | None = None, attempts: int = 0) -> None:
        super().__init__(message, step=step, node=node, cause="NodeUnreachable")
        self.deadline = deadline
        self.attempts = attempts


class NodeOffline(EngineError, NodeUnreachable):
    """A job needs a node the engine has marked offline: it fails fast.

    It is a :class:`transport.errors.NodeUnreachable` too, so callers that
    handle an unreachable node handle this one.
    """

    def __init__(self, message: str, *, node: str | None = None) -> None:
        super().__init__(message, node=node)
        self.node = node


class JobCancelled(EngineError):
    """Recorded as a cancelled job's error (carries the reason)."""


class CompensationFailed(EngineError):
    """A workflow's compensation (after a cancel or a failure) did not finish."""


class DependencyFailed(EngineError):
    """A job this job depends on did not succeed."""


class RecoveryPending(EngineError):
    """Crash recovery could not finish yet (a node is unreachable); it is retried."""


class EngineBusy(EngineError):
    """Another engine owns the store (runs its jobs); the message names it (pid, since, role)."""
