"""Workflows: what a job does, step by step, and how it undoes or recovers.

A workflow is a class registered for one operation kind::

    @register_workflow(StopInstance)
    class StopWorkflow(Workflow[StopInstance]):
        async def run(self, ctx): ...            # the forward path; returns the result (JSON-able)
        async def compensate(self, ctx, reason): ...  # undo after a cancel/failure (runs shielded)
        async def recover(self, ctx): ...        # after an engine crash: read journal + nodes → Outcome

Every remote action goes through :meth:`Context.call`, which journals the
step *before* acting, applies the deadline, retries idempotent reads, and
records the end (with any inventory change, in the same transaction).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import anyio
import msgspec

from transport.errors import CallTimeout, NodeUnreachable

from ._inventory import InstanceRecord, InventoryChange, SetAdminState, SetPrimary, AdminState
from ._jobs import ErrorInfo, Job, JobState, Step, StepState
from ._ops import Operation
from .errors import EngineError, InvalidOperation, NodeOffline, StepTimeout, StepUnreachable

if TYPE_CHECKING:
    from ._engine import Engine, _JobHandle

OpT = TypeVar("OpT", bound=Operation)

#: Workflow class per operation kind.
WORKFLOWS: dict[str, type[Workflow[Any]]] = {}

#: Engine services: ``async fn(engine)`` run by every engine from open to close.
SERVICES: dict[str, Callable[[Engine], Awaitable[None]]] = {}

ServiceT = TypeVar("ServiceT", bound=Callable[..., Awaitable[None]])


def register_service(name: str) -> Callable[[ServiceT], ServiceT]:
    """Decorator: run ``async fn(engine)`` in every engine, from :meth:`Engine.open` until it closes.

    For background duties that belong to the cluster, not to one job (the
    pending-cleanup janitor). A service that raises is logged and not restarted.
    """

    def deco(fn: ServiceT) -> ServiceT:
        if name in SERVICES and SERVICES[name] is not fn:
            raise TypeError(f"a service named {name!r} is already registered")
        SERVICES[name] = fn
        return fn

    return deco


def register_workflow(op_type: type[Operation]) -> Callable[[type[Workflow[Any]]], type[Workflow[Any]]]:
    """Class decorator: ``@register_workflow(StopInstance)``."""

    def deco(cls: type[Workflow[Any]]) -> type[Workflow[Any]]:
        kind = str(op_type.__struct_config__.tag)
        if kind in WORKFLOWS and WORKFLOWS[kind] is not cls:
            raise TypeError(f"a workflow for {kind!r} is already registered ({WORKFLOWS[kind].__name__})")
        WORKFLOWS[kind] = cls
        cls.OP = op_type
        return cls

    return deco


def workflow_for(kind: str) -> type[Workflow[Any]]:
    """The workflow class for ``kind`` (importing the built-in workflows first)."""
    if kind not in WORKFLOWS:
        import engine.workflows  # noqa: F401  (registers the built-ins)
    try:
        return WORKFLOWS[kind]
    except KeyError:
        raise InvalidOperation(f"no workflow registered for operation kind {kind!r}") from None


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


def summarize_args(args: Sequence[Any], kwargs: Mapping[str, Any], limit: int = 200) -> str:
    """A short, log-safe rendering of a call's arguments (instances by name)."""

    def one(value: Any) -> str:
        name = getattr(value, "name", None)
        if isinstance(value, msgspec.Struct) and isinstance(name, str):
            return f"<{type(value).__name__} {name}>"
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    text = ", ".join(parts)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _builtins(value: Any) -> Any:
    try:
        return msgspec.to_builtins(value)
    except TypeError:
        return repr(value)


@dataclass
class Context:
    """What a workflow sees of the engine while it runs one job."""

    engine: Engine
    handle: _JobHandle
    journal: list[Step]
    recovering: bool = False
    #: "run", "compensate" or "recover". Only the forward path fails fast on
    #: a node the pinger has marked offline; compensation and recovery try the
    #: node for real (it may be back), within their deadlines.
    mode: str = "run"
    rng: random.Random = field(default_factory=random.Random)
    log: Any = None
    #: Consecutive NodeUnreachable failures after which an idempotent read gives up.
    UNREACHABLE_ATTEMPTS: ClassVar[int] = 5
    _progress: list[dict[str, Any]] = field(default_factory=list)
    _progress_lock: anyio.Lock = field(default_factory=anyio.Lock)

    # --- identity -----------------------------------------------------------

    @property
    def job_id(self) -> int:
        return self.handle.id

    @property
    def op(self) -> Operation:
        return self.handle.op

    @property
    def cancel_reason(self) -> str | None:
        return self.handle.cancel_reason

    @property
    def point_of_no_return_reached(self) -> str | None:
        return self.handle.ponr

    def steps_named(self, name: str) -> list[Step]:
        return [s for s in self.journal if s.name == name]

    def last_step(self, name: str) -> Step | None:
        found = self.steps_named(name)
        return found[-1] if found else None

    # --- the cluster --------------------------------------------------------

    async def instance(self, name: str) -> InstanceRecord:
        return await self.engine.instance(name)

    def node_online(self, name: str) -> bool:
        return self.engine.node_online(name)

    # --- steps --------------------------------------------------------------

    async def call(
        self,
        node: str,
        method: str,
        /,
        *args: Any,
        deadline: float | None = None,
        idempotent: bool = False,
        step: str | None = None,
        inventory: Sequence[InventoryChange] = (),
        **kwargs: Any,
    ) -> Any:
        """Call ``method`` on ``node`` as one journaled step.

        The step's start (node, method, argument summary, deadline) is in the
        store before the call goes out; its end (result or error) after, with
        ``inventory`` changes applied in that same transaction (so "the
        instance now runs on B" is recorded exactly when the step that made
        it true is). ``deadline`` (s) defaults per method (the operation may
        override); running out raises :class:`StepTimeout` naming step, node
        and deadline, and the call is cancelled on the node. ``idempotent``
        reads retry transient transport errors with backoff inside the
        deadline; state-changing steps are never retried blindly.
        """
        name = step or method
        if deadline is None:
            deadline = self.op.deadline_for(name, method)
        record = await self.engine._step_start(self, name=name, node=node, method=method, args=summarize_args(args, kwargs), deadline=deadline)
        log = self.log.bind(step=name, node=node)
        log.info("step started", method=method, deadline=deadline)
        counter = [0]
        try:
            result = await self._invoke(node, method, args, kwargs, name=name, deadline=deadline, idempotent=idempotent, counter=counter, log=log)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._flush_progress()
                cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
                if cancelled:
                    state, info = StepState.CANCELLED, ErrorInfo(type="Cancelled", message=self.cancel_reason or "cancelled", node=node, step=name)
                elif isinstance(exc, StepTimeout):
                    state, info = StepState.TIMED_OUT, ErrorInfo.from_exception(exc, step=name, node=node)
                else:
                    state, info = StepState.FAILED, ErrorInfo.from_exception(exc, step=name, node=node)
                await self.engine._step_end(self, record, state=state, error=info, attempts=counter[0])
                if isinstance(exc, NodeUnreachable):
                    await self.engine._mark_unreachable(node, exc)
            if not cancelled and isinstance(exc, Exception) and getattr(exc, "step", None) is None:
                with contextlib.suppress(AttributeError):
                    exc.step = name  # type: ignore[attr-defined]
            log.warning("step ended", state=state.value, error=str(info))
            raise
        with anyio.CancelScope(shield=True):
            await self._flush_progress()
            await self.engine._step_end(self, record, state=StepState.SUCCEEDED, result=_builtins(result), attempts=counter[0], inventory=inventory)
        log.info("step ended", state="succeeded", attempts=counter[0])
        return result

    async def _invoke(
        self, node: str, method: str, args: Sequence[Any], kwargs: dict[str, Any], *,
        name: str, deadline: float, idempotent: bool, counter: list[int], log: Any,
    ) -> Any:
        """The call itself: deadline, fail-fast, retries of idempotent reads.

        An idempotent read that finds the node unreachable
        :attr:`UNREACHABLE_ATTEMPTS` times in a row (≈1.5 s of backoff), or on
        every attempt until its deadline, raises :class:`StepUnreachable` (a
        NodeUnreachable, so the node is marked offline and later jobs fail
        fast), not a bare StepTimeout after the whole deadline.
        """
        last_unreachable: BaseException | None = None
        unreachable_only = True
        streak = 0
        with anyio.move_on_after(deadline):
            while True:
                counter[0] += 1
                try:
                    return await self.engine._node_call(
                        node, method, args, kwargs, on_progress=self._node_progress(name, node), fail_fast=self.mode == "run"
                    )
                except (NodeUnreachable, CallTimeout) as err:
                    if not idempotent or isinstance(err, NodeOffline) or not self.node_online(node):
                        # Not blindly retried: state-changing calls, and any
                        # call to a node already known to be offline.
                        raise
                    if isinstance(err, NodeUnreachable):
                        last_unreachable = err
                        streak += 1
                        if streak >= self.UNREACHABLE_ATTEMPTS:
                            break
                    else:
                        unreachable_only, streak = False, 0
                    delay = min(0.05 * 2 ** min(counter[0], 8), 2.0) * (0.5 + self.rng.random())
                    log.warning("transient error; retrying", error=str(err), attempt=counter[0], retry_in=round(delay, 3))
                    await anyio.sleep(delay)
        if last_unreachable is not None and (unreachable_only or streak >= self.UNREACHABLE_ATTEMPTS):
            raise StepUnreachable(
                f"step {name!r} ({method}) on node {node}: NodeUnreachable on {counter[0]} attempts "
                f"({'in a row' if streak >= self.UNREACHABLE_ATTEMPTS else f'until its deadline of {deadline:g}s'}); last: {last_unreachable}",
                step=name, node=node, deadline=deadline, attempts=counter[0],
            ) from last_unreachable
        raise StepTimeout(
            f"step {name!r} ({method}) on node {node} did not finish within its deadline of {deadline:g}s",
            step=name,
            node=node,
            deadline=deadline,
        )

    async def read(self, node: str, method: str, /, *args: Any, deadline: float | None = None, step: str | None = None, **kwargs: Any) -> Any:
        """An idempotent read that is *not* journaled as its own step.

        For polling loops (``get_migration_status`` every second): wrap the
        loop in ``async with ctx.step("wait-migration", node=...)`` so the
        journal has one step, not one per poll. Deadline, fail-fast and
        retries as :meth:`call` (``idempotent=True``).
        """
        name = step or method
        if deadline is None:
            deadline = self.op.deadline_for(name, method)
        try:
            return await self._invoke(
                node, method, args, kwargs, name=name, deadline=deadline, idempotent=True, counter=[0], log=self.log.bind(step=name, node=node)
            )
        except NodeUnreachable as exc:
            with anyio.CancelScope(shield=True):
                await self.engine._mark_unreachable(node, exc)
            raise

    @contextlib.asynccontextmanager
    async def step(self, name: str, *, node: str | None = None, args: str = "", inventory: Sequence[InventoryChange] = ()) -> Any:
        """A journaled step that is not one node call (local work, a wait).

        ``async with ctx.step("decide") as s: s.result = {...}``
        """
        record = await self.engine._step_start(self, name=name, node=node, method=None, args=args, deadline=None)
        holder = _StepResult()
        try:
            yield holder
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
                state = StepState.CANCELLED if cancelled else StepState.FAILED
                info = ErrorInfo(type="Cancelled", message="cancelled") if cancelled else ErrorInfo.from_exception(exc, step=name, node=node)
                await self.engine._step_end(self, record, state=state, error=info)
            raise
        with anyio.CancelScope(shield=True):
            await self.engine._step_end(self, record, state=StepState.SUCCEEDED, result=_builtins(holder.result), inventory=[*inventory, *holder.inventory])

    async def commit(self, name: str, inventory: Sequence[InventoryChange], **result: Any) -> None:
        """Journal a zero-length step that records an inventory change."""
        async with self.step(name, inventory=inventory) as s:
            s.result = result or None

    async def set_primary(self, instance: str, node: str, *, step: str = "set-primary") -> None:
        """Record that ``instance`` now runs on ``node`` (a journaled step).

        Prefer ``ctx.call(..., inventory=[SetPrimary(...)])`` when a node call
        is what made it true: then both land in one transaction.
        """
        await self.commit(step, [SetPrimary(instance=instance, node=node)], instance=instance, node=node)

    async def set_admin_state(self, instance: str, state: AdminState, *, step: str = "set-admin-state") -> None:
        await self.commit(step, [SetAdminState(instance=instance, state=state)], instance=instance, state=state.value)

    # --- events -------------------------------------------------------------

    def progress(self, **fields: Any) -> None:
        """Report progress (an event; written promptly, in order, by the engine)."""
        self._progress.append(fields)
        self.engine._progress_pending(self)

    def _node_progress(self, step: str, node: str) -> Callable[[dict[str, Any]], None]:
        def forward(fields: dict[str, Any]) -> None:
            self.progress(step=step, node=node, **fields)

        return forward

    async def _flush_progress(self) -> None:
        async with self._progress_lock:
            while self._progress:
                batch, self._progress[:] = list(self._progress), []
                await self.engine._write_progress(self, batch)

    async def event(self, kind: str, **fields: Any) -> None:
        """Record a custom event on the job (``kind`` is free-form)."""
        await self._flush_progress()
        await self.engine._job_event(self.job_id, kind, _builtins(fields))

    async def point_of_no_return(self, reason: str) -> None:
        """From here on the job completes forward: a cancel is recorded, not obeyed."""
        await anyio.lowlevel.checkpoint()  # a cancel already requested wins
        await self.engine._set_ponr(self, reason)

    # --- cancellation & children --------------------------------------------

    @contextlib.contextmanager
    def shielded(self, timeout: float) -> Iterator[anyio.CancelScope]:
        """A shielded scope with its own deadline (for cleanup inside run/compensate)."""
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"shielded() needs a positive finite timeout, not {timeout!r}")
        with anyio.CancelScope(shield=True) as outer, anyio.fail_after(timeout):
            yield outer

    async def submit_child(self, op: Operation, *, priority: int | None = None) -> int:
        """Submit a child job (cancelling this job cancels it too)."""
        return await self.engine._submit_child(self.handle, op, priority=self.handle.priority if priority is None else priority)

    async def wait_child(self, job_id: int) -> Job:
        return await self.engine.wait(job_id)


class _StepResult:
    def __init__(self) -> None:
        self.result: Any = None
        self.inventory: list[InventoryChange] = []
