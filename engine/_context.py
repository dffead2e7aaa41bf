"""What a workflow sees while it runs one job: :class:`Context` and its collaborators.

``ctx.journal`` (steps, events, progress, the point of no return),
``ctx.nodes`` (typed node calls, health), ``ctx.inventory``, ``ctx.jobs``,
``ctx.policy``, ``ctx.clock`` and ``ctx.rng``. The journal and the nodes
are built here on the engine's narrow backends (:mod:`engine._seam`); the
engine composes them per job. Nothing here imports the engine.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import anyio
import msgspec

import hv
from transport.errors import CallTimeout, NodeUnreachable

from ._inventory import AdminState, InventoryChange, SetAdminState, SetPrimary
from ._jobs import ErrorInfo, Step, StepState
from ._ops import Operation
from ._seam import ClusterPolicy, Clock, Inventory, JobRecord, Jobs, NodeLink, SystemClock
from .errors import NodeOffline, StepTimeout, StepUnreachable


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


def to_builtins(value: Any) -> Any:
    """``value`` as JSON-able builtins for the store (its repr when it has none)."""
    try:
        return msgspec.to_builtins(value)
    except TypeError:
        return repr(value)


class StepResult:
    """What a ``journal.step`` block records: ``result`` and extra ``inventory`` changes."""

    def __init__(self) -> None:
        self.result: Any = None
        self.inventory: list[InventoryChange] = []


class Journal:
    """The job's journal: steps (start before acting, end after), events, progress, the point of no return."""

    def __init__(self, record: JobRecord, steps: list[Step]) -> None:
        self._record = record
        #: The steps so far (those of earlier runs first, when recovering).
        self.steps = steps
        self._progress: list[dict[str, Any]] = []
        self._progress_lock = anyio.Lock()

    # --- reading ------------------------------------------------------------

    def named(self, name: str) -> list[Step]:
        return [s for s in self.steps if s.name == name]

    def last(self, name: str) -> Step | None:
        """The newest step called ``name`` (None when there is none)."""
        found = self.named(name)
        return found[-1] if found else None

    def succeeded(self, name: str) -> bool:
        step = self.last(name)
        return step is not None and step.state is StepState.SUCCEEDED

    @property
    def point_of_no_return_reached(self) -> str | None:
        """The reason given at the point of no return, once it is passed."""
        return self._record.ponr

    # --- steps --------------------------------------------------------------

    async def start(self, *, name: str, node: str | None, method: str | None, args: str, deadline: float | None) -> Step:
        """Record a step's start (progress reported so far is written first)."""
        await self.flush()
        step = await self._record.step_start(name=name, node=node, method=method, args=args, deadline=deadline)
        self.steps.append(step)
        return step

    async def end(
        self, step: Step, *, state: StepState, result: Any = None, error: ErrorInfo | None = None,
        attempts: int = 1, inventory: Sequence[InventoryChange] = (),
    ) -> None:
        """Record a step's end, with ``inventory`` changes in the same transaction."""
        await self._record.step_end(step, state=state, result=result, error=error, attempts=attempts, inventory=inventory)

    @contextlib.asynccontextmanager
    async def step(self, name: str, *, node: str | None = None, args: str = "", inventory: Sequence[InventoryChange] = ()) -> AsyncIterator[StepResult]:
        """A journaled step that is not one node call (local work, a wait).

        ``async with ctx.journal.step("decide") as s: s.result = {...}``
        """
        record = await self.start(name=name, node=node, method=None, args=args, deadline=None)
        holder = StepResult()
        try:
            yield holder
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
                state = StepState.CANCELLED if cancelled else StepState.FAILED
                info = ErrorInfo(type="Cancelled", message="cancelled") if cancelled else ErrorInfo.from_exception(exc, step=name, node=node)
                await self.end(record, state=state, error=info)
            raise
        with anyio.CancelScope(shield=True):
            await self.end(record, state=StepState.SUCCEEDED, result=to_builtins(holder.result), inventory=[*inventory, *holder.inventory])

    async def commit(self, name: str, inventory: Sequence[InventoryChange], **result: Any) -> None:
        """Journal a zero-length step that records an inventory change."""
        async with self.step(name, inventory=inventory) as s:
            s.result = result or None

    async def set_primary(self, instance: str, node: str, *, step: str = "set-primary") -> None:
        """Record that ``instance`` now runs on ``node`` (a journaled step).

        Prefer ``ctx.nodes.call(node, inventory=[SetPrimary(...)])`` when a node
        call is what made it true: then both land in one transaction.
        """
        await self.commit(step, [SetPrimary(instance=instance, node=node)], instance=instance, node=node)

    async def set_admin_state(self, instance: str, state: AdminState, *, step: str = "set-admin-state") -> None:
        await self.commit(step, [SetAdminState(instance=instance, state=state)], instance=instance, state=state.value)

    # --- events -------------------------------------------------------------

    def progress(self, **fields: Any) -> None:
        """Report progress (an event; written promptly, in order, by the engine)."""
        self._progress.append(fields)
        self._record.progress_pending()

    def forward_progress(self, step: str, node: str) -> Callable[[dict[str, Any]], None]:
        """A node call's ``on_progress``: its reports become the job's progress events."""

        def forward(fields: dict[str, Any]) -> None:
            self.progress(step=step, node=node, **fields)

        return forward

    async def flush(self) -> None:
        """Write the progress reported so far (in order; one writer at a time)."""
        async with self._progress_lock:
            while self._progress:
                batch, self._progress[:] = list(self._progress), []
                for fields in batch:
                    await self._record.add_event("progress", to_builtins(fields))

    async def event(self, kind: str, **fields: Any) -> None:
        """Record a custom event on the job (``kind`` is free-form)."""
        await self.flush()
        await self._record.add_event(kind, to_builtins(fields))

    async def point_of_no_return(self, reason: str) -> None:
        """From here on the job completes forward: a cancel is recorded, not obeyed."""
        await anyio.lowlevel.checkpoint()  # a cancel already requested wins
        await self._record.set_ponr(reason)


class _NodeCall:
    """The attribute-checked proxy behind ``ctx.nodes.call(node, ...)`` (typed as BaseHypervisor)."""

    def __init__(self, nodes: Nodes, node: str, options: dict[str, Any], journaled: bool) -> None:
        self._nodes, self._node, self._options, self._journaled = nodes, node, options, journaled

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method not in hv.REMOTE_METHODS:
            raise AttributeError(f"{method!r} is not a node method (hv.REMOTE_METHODS)")

        async def invoke(*args: Any, **kwargs: Any) -> Any:
            if self._journaled:
                return await self._nodes._call(self._node, method, args, kwargs, **self._options)
            return await self._nodes._read(self._node, method, args, kwargs, **self._options)

        invoke.__name__ = method
        return invoke


class Nodes:
    """The cluster's nodes as a workflow calls them (``ctx.nodes``).

    ``await ctx.nodes.call(src, step="migrate").migrate_instance(spec, address, True)``:
    the object ``call`` returns is typed as :class:`hv.BaseHypervisor` (a type
    checker and a reader follow the call into the driver); at run time only
    the node methods (``hv.REMOTE_METHODS``) exist on it, and the call goes
    over the wire as one journaled step.
    """

    #: Consecutive NodeUnreachable failures after which an idempotent read gives up.
    UNREACHABLE_ATTEMPTS: ClassVar[int] = 5

    def __init__(self, link: NodeLink, journal: Journal, ctx: Context) -> None:
        self._link = link
        self._journal = journal
        self._ctx = ctx

    # --- health and names ---------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self._link.names)

    def online(self, name: str) -> bool:
        """Whether ``name`` is a known node the engine currently considers online."""
        return self._link.online(name)

    def address(self, name: str) -> str:
        """The node's address as other nodes reach it ("" lets the driver choose)."""
        return self._link.address(name)

    # --- calls --------------------------------------------------------------

    def call(
        self, node: str, *, step: str | None = None, deadline: float | None = None, idempotent: bool = False,
        inventory: Sequence[InventoryChange] = (),
    ) -> hv.BaseHypervisor:
        """``node``'s driver, each method call one journaled step.

        The step's start (node, method, argument summary, deadline) is in the
        store before the call goes out; its end (result or error) after, with
        ``inventory`` changes applied in that same transaction. ``step``
        names it (default: the method); ``deadline`` (s) defaults per step
        (the operation may override); running out raises
        :class:`StepTimeout` and the call is cancelled on the node.
        ``idempotent`` reads retry transient transport errors with backoff
        inside the deadline; state-changing steps are never retried blindly.
        """
        options = {"step": step, "deadline": deadline, "idempotent": idempotent, "inventory": tuple(inventory)}
        return cast(hv.BaseHypervisor, _NodeCall(self, node, options, journaled=True))

    def read(self, node: str, *, step: str | None = None, deadline: float | None = None) -> hv.BaseHypervisor:
        """``node``'s driver for idempotent reads that are *not* journaled as steps.

        For polling loops (``get_migration_status`` every second): wrap the
        loop in ``async with ctx.journal.step("wait-migration", node=...)`` so
        the journal has one step, not one per poll. Deadline, fail-fast and
        retries as :meth:`call` with ``idempotent=True``.
        """
        return cast(hv.BaseHypervisor, _NodeCall(self, node, {"step": step, "deadline": deadline}, journaled=False))

    async def ping(self, node: str, *, step: str = "ping", deadline: float | None = None) -> None:
        """Ping ``node``'s agent as one journaled step (not a driver method)."""
        await self._call(node, "ping", (), {}, step=step, deadline=deadline, idempotent=False, inventory=())

    async def _call(
        self, node: str, method: str, args: Sequence[Any], kwargs: dict[str, Any], *,
        step: str | None, deadline: float | None, idempotent: bool, inventory: Sequence[InventoryChange],
    ) -> Any:
        ctx, journal = self._ctx, self._journal
        name = step or method
        if deadline is None:
            deadline = ctx.op.deadline_for(name, method)
        record = await journal.start(name=name, node=node, method=method, args=summarize_args(args, kwargs), deadline=deadline)
        log = ctx.log.bind(step=name, node=node)
        log.info("step started", method=method, deadline=deadline)
        counter = [0]
        try:
            result = await self._invoke(node, method, args, kwargs, name=name, deadline=deadline, idempotent=idempotent, counter=counter, log=log)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await journal.flush()
                cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
                if cancelled:
                    state, info = StepState.CANCELLED, ErrorInfo(type="Cancelled", message=ctx.cancel_reason or "cancelled", node=node, step=name)
                elif isinstance(exc, StepTimeout):
                    state, info = StepState.TIMED_OUT, ErrorInfo.from_exception(exc, step=name, node=node)
                else:
                    state, info = StepState.FAILED, ErrorInfo.from_exception(exc, step=name, node=node)
                await journal.end(record, state=state, error=info, attempts=counter[0])
                if isinstance(exc, NodeUnreachable):
                    await self._link.mark_unreachable(node, exc)
            if not cancelled and isinstance(exc, Exception) and getattr(exc, "step", None) is None:
                with contextlib.suppress(AttributeError):
                    exc.step = name  # type: ignore[attr-defined]
            log.warning("step ended", state=state.value, error=str(info))
            raise
        with anyio.CancelScope(shield=True):
            await journal.flush()
            await journal.end(record, state=StepState.SUCCEEDED, result=to_builtins(result), attempts=counter[0], inventory=inventory)
        log.info("step ended", state="succeeded", attempts=counter[0])
        return result

    async def _read(self, node: str, method: str, args: Sequence[Any], kwargs: dict[str, Any], *, step: str | None, deadline: float | None) -> Any:
        ctx = self._ctx
        name = step or method
        if deadline is None:
            deadline = ctx.op.deadline_for(name, method)
        try:
            return await self._invoke(
                node, method, args, kwargs, name=name, deadline=deadline, idempotent=True, counter=[0], log=ctx.log.bind(step=name, node=node)
            )
        except NodeUnreachable as exc:
            with anyio.CancelScope(shield=True):
                await self._link.mark_unreachable(node, exc)
            raise

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
        ctx = self._ctx
        last_unreachable: BaseException | None = None
        unreachable_only = True
        streak = 0
        with anyio.move_on_after(deadline):
            while True:
                counter[0] += 1
                try:
                    return await self._link.call(
                        node, method, args, kwargs, on_progress=self._journal.forward_progress(name, node), fail_fast=ctx.mode == "run"
                    )
                except (NodeUnreachable, CallTimeout) as err:
                    if not idempotent or isinstance(err, NodeOffline) or not self.online(node):
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
                    delay = min(0.05 * 2 ** min(counter[0], 8), 2.0) * (0.5 + ctx.rng.random())
                    log.warning("transient error; retrying", error=str(err), attempt=counter[0], retry_in=round(delay, 3))
                    await ctx.clock.sleep(delay)
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


@dataclass(eq=False)
class Context:
    """What a workflow sees of the engine while it runs one job (never the engine itself).

    Built by the engine for each run, compensation or recovery: ``record``
    (the job's store side), ``link`` (the nodes), ``inventory``, ``jobs``,
    ``policy``, ``clock`` and ``rng``; :attr:`journal` and :attr:`nodes` are
    composed from them.
    """

    record: JobRecord
    link: NodeLink
    inventory: Inventory
    jobs: Jobs
    steps: list[Step] = field(default_factory=list)
    policy: ClusterPolicy = field(default_factory=ClusterPolicy)
    clock: Clock = field(default_factory=SystemClock)
    rng: random.Random = field(default_factory=random.Random)
    recovering: bool = False
    #: "run", "compensate" or "recover". Only the forward path fails fast on
    #: a node the pinger has marked offline; compensation and recovery try the
    #: node for real (it may be back), within their deadlines.
    mode: str = "run"
    log: Any = None
    journal: Journal = field(init=False)
    nodes: Nodes = field(init=False)
    #: True when the engine (not the job) is closing: a cancel then is the engine's.
    engine_closing: Callable[[], bool] = field(default=lambda: False)

    def __post_init__(self) -> None:
        self.journal = Journal(self.record, self.steps)
        self.nodes = Nodes(self.link, self.journal, self)

    @property
    def job_id(self) -> int:
        return self.record.job_id

    @property
    def op(self) -> Operation:
        return self.record.op

    @property
    def cancel_reason(self) -> str | None:
        return self.record.cancel_reason

    @contextlib.contextmanager
    def shielded(self, timeout: float) -> Iterator[anyio.CancelScope]:
        """A shielded scope with its own deadline (for cleanup inside run/compensate)."""
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"shielded() needs a positive finite timeout, not {timeout!r}")
        with anyio.CancelScope(shield=True) as outer, anyio.fail_after(timeout):
            yield outer
