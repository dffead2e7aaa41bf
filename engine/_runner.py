"""The job's life, from queued to final: wait for dependencies and locks, run, compensate, recover.

A part of :class:`engine.Engine` (a base class of it): what the engine does
with one :class:`~engine._recorder.JobHandle`, and how it builds the
workflow's :class:`~engine.Context` from collaborators bound to the job
(never the engine itself).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec

from transport.errors import CallTimeout, NodeUnreachable

from ._context import Context, to_builtins
from ._health import NodeHealth
from ._inventory import InstanceRecord
from ._jobs import ErrorInfo, Job, JobState
from ._locks import normalise
from ._ops import Operation
from ._policy import MigrationPolicy
from ._recorder import JobBackend, JobHandle, Recorder, shielded
from ._scheduler import Scheduler, safe_migration_nodes
from ._seam import Clock, ClusterPolicy
from ._store import Store
from ._workflow import Outcome, Workflow, workflow_for
from .errors import CompensationFailed, DependencyFailed, EngineError, JobCancelled, RecoveryPending, StepTimeout


class JobRunner:
    """Drives jobs (a base of :class:`engine.Engine`; the attributes below are the engine's)."""

    store: Store
    workflows: dict[str, type[Workflow[Any]]]
    migration_policy: MigrationPolicy
    wall_clock: Clock
    clock: Callable[[], float]
    rng: random.Random
    log: Any
    recovery_backoff: tuple[float, float]
    _rec: Recorder
    _sched: Scheduler
    _nodes: NodeHealth
    _handles: dict[int, JobHandle]
    _closing: bool
    _draining: bool

    # The engine's public API, used here.
    node_names: list[str]
    closing: bool
    submit: Callable[..., Awaitable[int]]
    wait: Callable[[int], Awaitable[Job]]
    get: Callable[[int], Awaitable[Job]]
    cancel: Callable[..., Awaitable[JobState]]
    instance: Callable[[str], Awaitable[InstanceRecord]]
    instances: Callable[[], Awaitable[dict[str, InstanceRecord]]]
    list: Callable[..., Awaitable[list[Job]]]
    _inventory: Callable[[], Awaitable[dict[str, InstanceRecord]]]
    _inventory_changed: Callable[[], None]

    async def _job_main(self, h: JobHandle) -> None:
        log = self.log.bind(job_id=h.id, op=h.op.kind)
        try:
            if h.recovering:
                await self._recover(h, log)
            else:
                await self._drive(h, log)
        except anyio.get_cancelled_exc_class():
            if not self._closing:
                log.error("job task cancelled unexpectedly")
            raise
        except BaseException as exc:  # a bug in the engine: record it, never lose the job silently
            log.exception("engine error while driving job")
            if not self._closing and not h.state.final:
                with contextlib.suppress(Exception):
                    await self._rec.finish(h, JobState.FAILED, error=ErrorInfo.from_exception(exc))
            if not isinstance(exc, Exception):
                raise
        finally:
            self._sched.release(h)
            if h.state.final or not self._closing:
                self._handles.pop(h.id, None)
            h.done.set()
            if not self._closing:
                self._schedule()

    async def _drive(self, h: JobHandle, log: Any) -> None:
        """From queued to running, then the workflow."""
        h.scope = anyio.CancelScope()
        if h.cancel_reason is not None:
            h.scope.cancel()
        failure: BaseException | None = None
        with h.scope:
            if h.state is JobState.QUEUED:
                failure = await self._wait_dependencies(h)
            if failure is None:
                while True:
                    inventory = await self._inventory()
                    try:
                        h.op.validate(inventory, self.node_names)
                        h.locks = normalise(h.op.lock_requests(inventory))
                    except EngineError as err:
                        failure = err
                        break
                    h.migration_nodes = safe_migration_nodes(h.op, inventory)
                    self._sched.waiting[h.id] = h
                    self._schedule()
                    states = [] if h.state is JobState.WAITING else [JobState.WAITING]
                    if not h.granted.is_set():
                        if states:
                            await self._rec.transition(h, states)
                            states = []
                        await h.granted.wait()
                        # Inventory may have moved while we waited (a migration):
                        # the locks must match where the instance is *now*.
                        fresh = await self._inventory()
                        try:
                            wanted = normalise(h.op.lock_requests(fresh))
                        except (KeyError, EngineError):
                            wanted = h.locks  # validation on the next pass will say why
                        if wanted != h.locks:
                            log.info("inventory changed while waiting; re-queueing for the right locks")
                            self._sched.release(h)
                            h.granted = anyio.Event()
                            self._schedule()
                            continue
                    await self._rec.transition(h, [*states, JobState.RUNNING])
                    break
        if failure is not None:
            await self._rec.finish(h, JobState.FAILED, error=ErrorInfo.from_exception(failure))
            return
        if h.state is not JobState.RUNNING:
            # Cancelled before it ran.
            if h.cancel_reason is not None:
                await self._rec.finish(h, JobState.CANCELLED, error=ErrorInfo.from_exception(JobCancelled(f"cancelled while {h.state.value}: {h.cancel_reason}")))
            return
        await self._execute(h, log)

    async def _wait_dependencies(self, h: JobHandle) -> BaseException | None:
        for dep in h.depends_on:
            job = await self.wait(dep)
            if job.state is not JobState.SUCCEEDED:
                why = f": {job.error}" if job.error else ""
                return DependencyFailed(f"job {dep}, which job {h.id} depends on, ended {job.state.value}{why}")
        return None

    async def _execute(self, h: JobHandle, log: Any) -> None:
        workflow = workflow_for(self.workflows, h.op.kind)(h.op)
        ctx = await self._context(h, log)
        work = anyio.CancelScope()
        h.scope = work
        if h.cancel_reason is not None and h.ponr is None:
            work.cancel()
        result: Any = None
        error: BaseException | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._progress_writer, h, ctx)
            with work:
                try:
                    result = await workflow.run(ctx)
                except Exception as exc:  # the workflow failed
                    error = exc
            with anyio.CancelScope(shield=True):
                if work.cancelled_caught or (error is None and h.cancel_reason is not None and h.ponr is None and work.cancel_called):
                    await self._compensate_and_finish(h, workflow, ctx, log, cancelled=True, error=None)
                elif error is not None:
                    if h.ponr is None:
                        await self._compensate_and_finish(h, workflow, ctx, log, cancelled=False, error=error)
                    else:
                        await ctx.journal.flush()
                        await self._rec.finish(h, JobState.FAILED, error=ErrorInfo.from_exception(error))
                else:
                    result = to_builtins(result)
                    if h.cancel_reason is not None:
                        note = {
                            "reason": h.cancel_reason,
                            "too_late": True,
                            "note": f"the cancel arrived after the point of no return ({h.ponr}); the job completed",
                        }
                        result = {**result, "cancel": note} if isinstance(result, dict) else {"value": result, "cancel": note}
                    await ctx.journal.flush()
                    await self._rec.finish(h, JobState.SUCCEEDED, result=result)
            tg.cancel_scope.cancel()

    async def _compensate_and_finish(
        self, h: JobHandle, workflow: Workflow[Any], ctx: Context, log: Any, *, cancelled: bool, error: BaseException | None
    ) -> None:
        reason = h.cancel_reason if cancelled else f"failed: {error}"
        if cancelled:
            await self._rec.transition(h, [JobState.CANCELLING], data={"reason": reason})
        log.info("compensating", reason=reason)
        ctx.mode = "compensate"
        comp_error: BaseException | None = None
        try:
            with anyio.fail_after(workflow.COMPENSATION_TIMEOUT):
                await workflow.compensate(ctx, reason or "")
        except Exception as exc:
            comp_error = exc
            log.error("compensation failed", error=str(exc))
        await ctx.journal.flush()
        if cancelled and comp_error is None:
            await self._rec.finish(h, JobState.CANCELLED, error=ErrorInfo.from_exception(JobCancelled(f"cancelled: {reason}")))
        elif cancelled:
            await self._rec.finish(
                h, JobState.FAILED,
                error=ErrorInfo.from_exception(CompensationFailed(f"cancelled ({reason}), but compensation failed: {type(comp_error).__name__}: {comp_error}")),
            )
        else:
            assert error is not None
            info = ErrorInfo.from_exception(error)
            if comp_error is not None:
                info = msgspec.structs.replace(info, message=f"{info.message} (and compensation failed: {type(comp_error).__name__}: {comp_error})")
            await self._rec.finish(h, JobState.FAILED, error=info)

    async def _recover(self, h: JobHandle, log: Any) -> None:
        """Drive a job found running at open to a final state; never guess."""
        workflow = workflow_for(self.workflows, h.op.kind)(h.op)
        delay, cap = self.recovery_backoff
        log.warning("recovering job found active at open", state=h.state.value)
        while True:
            ctx = await self._context(h, log, recovering=True)
            failure: Exception | None = None
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._progress_writer, h, ctx)
                try:
                    outcome = await workflow.recover(ctx)
                except Exception as exc:  # caught here, so no ExceptionGroup wraps it
                    failure = exc
                finally:
                    tg.cancel_scope.cancel()
            try:
                if failure is not None:
                    raise failure
            except (NodeUnreachable, CallTimeout, RecoveryPending, StepTimeout) as exc:
                note = f"recovery pending: {type(exc).__name__}: {exc}; retrying in {delay:.1f}s"
                log.warning("recovery pending", error=str(exc), retry_in=delay)
                self._rec.publish(await shielded(self.store.set_recovery(h.id, note, now=self.clock())))
                await anyio.sleep(delay * (0.75 + 0.5 * self.rng.random()))
                delay = min(cap, delay * 2)
                continue
            except Exception as exc:
                outcome = Outcome.failed(exc)
            break
        if not isinstance(outcome, Outcome):
            outcome = Outcome.failed(EngineError(f"{type(workflow).__name__}.recover returned {outcome!r}, not an Outcome"))
        await ctx.journal.flush()
        result = to_builtins(outcome.result)
        if isinstance(result, dict):
            result = {**result, "recovered": True}
        elif result is None:
            result = {"recovered": True}
        error = ErrorInfo.from_exception(outcome.error) if outcome.error is not None else None
        if outcome.state is JobState.FAILED and error is None:
            error = ErrorInfo(type="EngineError", message="recovery failed the job")
        await self._rec.finish(h, outcome.state, result=result, error=error)

    async def _context(self, h: JobHandle, log: Any, recovering: bool = False) -> Context:
        """The workflow's view of this job: collaborators bound to the handle, never the engine."""
        job = await self.store.get_job(h.id)
        ctx = Context(
            record=JobBackend(self._rec, h, log, self._inventory_changed),
            link=self._nodes,
            inventory=EngineInventory(self),
            jobs=EngineJobs(self, h),
            steps=list(job.steps),
            policy=ClusterPolicy(migration=self.migration_policy),
            clock=self.wall_clock,
            rng=random.Random(self.rng.random()),
            recovering=recovering,
            mode="recover" if recovering else "run",
            log=log,
            engine_closing=lambda: self.closing,
        )
        h.ctx = ctx
        return ctx

    # --- scheduling ---------------------------------------------------------

    def _schedule(self) -> None:
        if not self._closing:
            self._sched.schedule(draining=self._draining)

    async def _submit_child(self, parent: JobHandle, op: Operation, *, priority: int) -> int:
        job_id = await self.submit(op, priority=priority, parent_id=parent.id)
        parent.children.add(job_id)
        if parent.cancel_reason is not None and parent.ponr is None:
            await self.cancel(job_id, f"parent job {parent.id} cancelled: {parent.cancel_reason}", wait=False)
        return job_id

    async def _progress_writer(self, h: JobHandle, ctx: Context) -> None:
        while True:
            await h.progress_wake.wait()
            h.progress_wake = anyio.Event()
            await ctx.journal.flush()


class EngineInventory:
    """``ctx.inventory``: reads of the engine's (cached) inventory."""

    def __init__(self, engine: JobRunner) -> None:
        self._engine = engine

    async def instance(self, name: str) -> InstanceRecord:
        return await self._engine.instance(name)

    async def all(self) -> dict[str, InstanceRecord]:
        return await self._engine.instances()


class EngineJobs:
    """``ctx.jobs``: children of one job, and waiting on jobs."""

    def __init__(self, engine: JobRunner, handle: JobHandle) -> None:
        self._engine = engine
        self._handle = handle

    async def submit_child(self, op: Operation, *, priority: int | None = None) -> int:
        """Submit a child job (cancelling this job cancels it too)."""
        h = self._handle
        return await self._engine._submit_child(h, op, priority=h.priority if priority is None else priority)

    async def wait(self, job_id: int) -> Job:
        return await self._engine.wait(job_id)

    async def get(self, job_id: int) -> Job:
        return await self._engine.get(job_id)

    async def children(self) -> list[Job]:
        """This job's children (without steps), oldest first."""
        return [j for j in await self._engine.list() if j.parent_id == self._handle.id]
