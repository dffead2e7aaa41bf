"""The Engine: submits, schedules, runs, cancels, recovers and watches jobs.

One engine *owns* a store at a time: only the owner runs its jobs (it holds
the store's owner lock for its whole life). Another engine opened on the same
store is a *client*: it writes the jobs it submits into the store for the
owner, follows them there, and (role ``auto``) takes over when the owner exits.
Every state change is written to the store (shielded from cancellation, so a
write that starts also finishes and is announced) *before* the engine acts on it.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskGroup

import hv
from transport import Transport
from transport.errors import CallTimeout, NodeUnreachable

from ._cluster import Cluster, load_cluster
from ._context import Context, to_builtins
from ._health import NodeHealth, NodeStatus
from ._inventory import InstanceRecord
from ._jobs import ErrorInfo, Event, Job, JobState
from ._locks import normalise
from ._log import configure_logging, get_logger
from ._ops import Operation
from ._optable import BUILTIN_OPERATIONS
from ._policy import DEFAULT_POLICY, MigrationPolicy
from ._recorder import JobBackend, JobHandle, Recorder, shielded
from ._scheduler import Scheduler, safe_migration_nodes
from ._seam import Clock, ClusterPolicy, Service, SystemClock
from ._store import SqliteStore, Store
from ._workflow import Outcome, Workflow, check_workflows, workflow_for
from .workflows import BUILTIN_SERVICES, BUILTIN_WORKFLOWS
from .errors import (
    CompensationFailed,
    DependencyFailed,
    EngineBusy,
    EngineError,
    InstanceNotKnown,
    InvalidOperation,
    JobCancelled,
    JobNotFound,
    NodeOffline,
    RecoveryPending,
    StepTimeout,
)

PRIORITY_MIN, PRIORITY_MAX = -20, 19


class Engine:
    """The job engine. Open it with ``async with Engine.open(...) as engine``."""

    def __init__(
        self,
        store: Store,
        cluster: Cluster,
        transport: Transport,
        *,
        clock: Clock | Callable[[], float] | None = None,
        rng: random.Random | None = None,
        workflows: Mapping[str, type[Workflow[Any]]] | None = None,
        services: Mapping[str, Service] | None = None,
        migration_policy: MigrationPolicy | None = None,
        max_running_jobs: int = 32,
        max_migrations_per_node: int = 1,
        node_ping_interval: float | None = 5.0,
        node_ping_timeout: float | None = None,
        recovery_backoff: tuple[float, float] = (0.5, 30.0),
        cancel_poll_interval: float = 0.15,
    ) -> None:
        if not isinstance(max_running_jobs, int) or max_running_jobs < 1:
            raise ValueError(f"max_running_jobs must be an int >= 1, not {max_running_jobs!r}")
        if not isinstance(max_migrations_per_node, int) or max_migrations_per_node < 1:
            raise ValueError(f"max_migrations_per_node must be an int >= 1, not {max_migrations_per_node!r}")
        if node_ping_interval is not None and not (math.isfinite(node_ping_interval) and node_ping_interval > 0):
            raise ValueError(f"node_ping_interval must be a positive number of seconds or None, not {node_ping_interval!r}")
        if migration_policy is not None and not isinstance(migration_policy, MigrationPolicy):
            raise ValueError(f"migration_policy must be a MigrationPolicy, not {type(migration_policy).__name__}")
        if workflows is None or services is None:
            workflows = BUILTIN_WORKFLOWS if workflows is None else workflows
            services = BUILTIN_SERVICES if services is None else services
        #: Workflow class per operation kind (this engine's table).
        self.workflows = check_workflows(workflows)
        #: Services the owner runs from open to close: ``async fn(host)``.
        self.services: dict[str, Service] = dict(services)
        #: The cluster default migration policy (an operation's ``policy`` overrides it).
        self.migration_policy: MigrationPolicy = migration_policy or DEFAULT_POLICY
        #: Operation class per kind: the built-ins and each workflow's ``OP``.
        self.operations = {**BUILTIN_OPERATIONS, **{kind: wf.OP for kind, wf in self.workflows.items()}}
        if isinstance(store, SqliteStore):
            store.operations = self.operations  # the store decodes the jobs this engine runs
        self.store = store
        self.cluster = cluster
        self.transport = transport
        self.wall_clock: Clock = clock if clock is not None and hasattr(clock, "now") else SystemClock(clock)  # type: ignore[arg-type]
        self.clock: Callable[[], float] = self.wall_clock.now
        self.rng = rng or random.Random()
        self.log = get_logger()
        self._rec = Recorder(store, self.clock, self.log)
        self._sched = Scheduler(max_running_jobs, max_migrations_per_node)
        # A ping that is slow (a loaded node) is not a dead node: the transport's
        # keepalive reports dead connections fast; this bound is for hangs.
        self._nodes = NodeHealth(
            transport, cluster, self._rec, rng=self.rng, ping_interval=node_ping_interval,
            ping_timeout=node_ping_timeout or 5.0, closing=lambda: self._closing,
        )
        self.recovery_backoff = recovery_backoff
        if not (math.isfinite(cancel_poll_interval) and cancel_poll_interval > 0):
            raise ValueError(f"cancel_poll_interval must be a positive number of seconds, not {cancel_poll_interval!r}")
        #: Seconds between reads of the store's cancel requests (other processes' cancels).
        self.cancel_poll_interval = cancel_poll_interval
        self._cancel_seq = 0
        self._services: set[str] = set()
        self._owner = True  # False for a client: another engine owns the store and runs its jobs
        self._identity: dict[str, Any] = {}
        self._draining = False
        self._claim = False  # a client of role auto: retries the owner lock
        self._last_job_id = 0  # the newest job id this owner has seen in the store
        self._pending_submits = 0  # local submits between the store write and their handle
        self._handles: dict[int, JobHandle] = {}
        self._tg: TaskGroup | None = None
        self._closing = False
        self._inventory_cache: dict[str, InstanceRecord] | None = None
        self._inventory_generation = 0

    # --- opening ------------------------------------------------------------

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        store: str | os.PathLike[str] | Store,
        cluster: Cluster | Any | str | os.PathLike[str],
        *,
        transport: Transport | None = None,
        log_json: bool | None = None,
        role: str = "auto",
        label: str | None = None,
        **options: Any,
    ) -> AsyncIterator[Engine]:
        """Open the store, connect to the cluster, recover, and start scheduling.

        ``cluster``: a :class:`Cluster`, the transport's ClusterConfig, or a
        cluster file path. ``transport`` None: built with ``transport.connect``
        (and closed on exit).

        ``role``: ``"owner"`` takes the store's owner lock or raises
        :class:`EngineBusy` naming the engine that holds it; ``"client"`` never
        runs jobs (``submit`` writes them into the store for the owner, ``wait``
        and ``watch`` follow the store, ``cancel`` reaches the owner by request);
        ``"auto"`` (default) is the owner if the lock is free, else a client
        that retries the lock every ``cancel_poll_interval`` and becomes the
        owner (adopting every queued job and recovering interrupted ones) once
        the owner exits. ``label`` names this engine to others (default: argv[0]).

        On close, jobs not started stay ``queued``/``waiting`` (as if never
        started); jobs running stay ``running`` and the next owner recovers
        them. :meth:`drain` first to finish the running ones.
        """
        configure_logging(json=log_json)
        if role not in ("auto", "owner", "client"):
            raise ValueError(f"role must be 'auto', 'owner' or 'client', not {role!r}")
        if isinstance(cluster, (str, os.PathLike)):
            cluster = load_cluster(cluster)
        elif not isinstance(cluster, Cluster):
            cluster = Cluster(config=cluster)
        the_store = store if isinstance(store, Store) else SqliteStore(Path(store))
        identity = {
            "pid": os.getpid(), "since": time.time(), "host": socket.gethostname(),
            "role": label or Path(sys.argv[0] or "python").name,
        }
        async with contextlib.AsyncExitStack() as stack:
            await the_store.open()
            stack.push_async_callback(the_store.aclose)
            owner = False
            if role != "client":
                owner = await the_store.try_own(identity)
                if not owner and role == "owner":
                    # A client (`herd cancel`) may hold the lock for a moment: retry briefly.
                    with anyio.move_on_after(1.0):
                        while not owner:
                            await anyio.sleep(0.05)
                            owner = await the_store.try_own(identity)
                    if not owner:
                        raise EngineBusy(await _busy_message(the_store))
            if transport is None:
                import transport as transport_pkg

                if cluster.config is None:
                    raise EngineError("Engine.open needs a cluster config with nodes, or a transport")
                transport = await stack.enter_async_context(transport_pkg.connect(cluster.config))
            engine = cls(the_store, cluster, transport, **options)
            engine._owner = owner
            engine._identity = identity
            engine._claim = role == "auto" and not owner
            await engine._seed_inventory()
            # The caller's exception is re-raised outside the task group, so
            # it reaches them as itself, not wrapped in an ExceptionGroup.
            caller_error: BaseException | None = None
            async with anyio.create_task_group() as tg:
                engine._tg = tg
                engine._nodes.tg = tg
                try:
                    await engine._start()
                    try:
                        yield engine
                    except BaseException as exc:
                        caller_error = exc
                finally:
                    engine._closing = True
                    tg.cancel_scope.cancel()
                    engine._rec.close_subscribers()
            if caller_error is not None:
                raise caller_error

    @property
    def node_names(self) -> list[str]:
        return self._nodes.names

    async def _inventory(self) -> dict[str, InstanceRecord]:
        """The inventory, cached between changes.

        Every inventory write goes through this engine (one engine per store
        for now; several engines will need the store to notify changes), and
        each bumps the generation, so a read that raced a write is not cached.
        """
        if self._inventory_cache is not None:
            return self._inventory_cache
        generation = self._inventory_generation
        inventory = await self.store.instances()
        if generation == self._inventory_generation:
            self._inventory_cache = inventory
        return inventory

    def _inventory_changed(self) -> None:
        self._inventory_generation += 1
        self._inventory_cache = None

    async def _seed_inventory(self) -> None:
        existing = await self.store.instances()
        for name, record in self.cluster.instances.items():
            if name not in existing:
                await self.store.add_instance(record, now=self.clock())
        self._inventory_changed()

    async def _start(self) -> None:
        assert self._tg is not None
        if self._owner:
            await self._adopt()
        else:
            self._cancel_seq = await self.store.last_cancel_request()
            if self._claim:
                self.log.info(
                    "another engine owns this store: jobs submitted here go to it until it exits",
                    owner=await self.store.owner(),
                )
                self._tg.start_soon(self._claim_ownership, name="owner-lock retry")
        self._tg.start_soon(self._cancel_watcher, name="store watcher")

    async def _claim_ownership(self) -> None:
        """A client of role auto: retry the owner lock until the owner exits, then own."""
        while not self._closing:
            await anyio.sleep(self.cancel_poll_interval)
            if await self.store.try_own(self._identity):
                self.log.info("the previous owner exited: this engine owns the store now")
                await self._adopt()
                self._owner = True
                return

    async def _adopt(self) -> None:
        """As the new owner: take every non-final job in the store (recover the active ones)."""
        assert self._tg is not None
        # Before the jobs are read: a request written after this is seen by the watcher,
        # one written before is in the job's cancel_reason.
        self._cancel_seq = await self.store.last_cancel_request()
        jobs = await self.store.list_jobs(states=[JobState.QUEUED, JobState.WAITING, JobState.RUNNING, JobState.CANCELLING])
        self._last_job_id = max([self._last_job_id, *(j.id for j in jobs)])
        await self._take(jobs)
        if self._nodes.ping_interval is not None:
            for name in self.node_names:
                self._tg.start_soon(self._nodes.pinger, name)
        # Services act on the cluster: the owner's job, not every client's.
        for name, fn in self.services.items():
            self.add_service(fn, name=name)

    async def _take(self, jobs: Sequence[Job]) -> None:
        """Drive ``jobs`` (read from the store; those already driven here are skipped)."""
        assert self._tg is not None
        inventory = await self.store.instances()
        jobs = [j for j in jobs if j.id not in self._handles]  # after the await: no duplicate handle
        fresh: list[JobHandle] = []
        for job in jobs:
            handle = JobHandle(
                id=job.id, op=job.op, state=job.state, priority=job.priority, depends_on=job.depends_on,
                parent_id=job.parent_id, cancel_reason=job.cancel_reason, ponr=job.point_of_no_return,
            )
            self._handles[job.id] = handle
            fresh.append(handle)
            if job.parent_id in self._handles:
                self._handles[job.parent_id].children.add(job.id)
            if job.state.active:
                # Recovered jobs take their locks first, before any new job.
                handle.recovering = True
                try:
                    handle.locks = normalise(job.op.lock_requests(inventory))
                except (KeyError, EngineError):
                    handle.locks = []
                handle.migration_nodes = safe_migration_nodes(job.op, inventory)
                self._sched.start_recovered(handle)
                self._tg.start_soon(self._job_main, handle)
        for handle in fresh:
            if not handle.recovering:
                self._tg.start_soon(self._job_main, handle)

    # --- public API ---------------------------------------------------------

    @property
    def is_owner(self) -> bool:
        """Whether this engine owns the store (runs its jobs); False for a client."""
        return self._owner

    @property
    def idle(self) -> bool:
        """No job is driven here (``herd serve --exit-when-idle``)."""
        return not self._handles

    async def drain(self, *, on_wait: Callable[[list[int]], None] | None = None) -> list[int]:
        """Stop starting jobs and wait until the jobs this engine runs are final.

        Jobs not yet started stay ``queued``/``waiting`` for the next owner
        (children a running job submits still run: the parent waits on them).
        ``on_wait(ids)`` is called once, before waiting, if any job runs.
        Returns the ids waited for.
        """
        self._draining = True
        waited: list[int] = []
        while True:
            running = sorted(i for i in self._sched.running if i in self._handles)
            if not running:
                return waited
            if not waited and on_wait is not None:
                on_wait(running)
            waited += [i for i in running if i not in waited]
            for job_id in running:
                handle = self._handles.get(job_id)
                if handle is not None:
                    await handle.done.wait()

    @property
    def closing(self) -> bool:
        """True once the engine is closing (or not open): a cancel then is the engine's, not the job's."""
        return self._closing or self._tg is None

    def node_online(self, name: str) -> bool:
        """Whether ``name`` is a known node the engine currently considers online."""
        return self._nodes.online(name)

    def add_service(self, fn: Service, *, name: str | None = None) -> None:
        """Run ``async fn(engine)`` until the engine closes (the ``services`` table
        given to :meth:`open` is started by the owner). Once per name."""
        label = name or getattr(fn, "__qualname__", repr(fn))
        if self._tg is None or self._closing:
            raise EngineError(f"service {label}: the engine is not open")
        if label in self._services:
            return
        self._services.add(label)
        self._tg.start_soon(self._run_service, fn, label, name=f"service {label}")

    async def _run_service(self, fn: Service, label: str) -> None:
        log = self.log.bind(service=label)
        log.info("service started")
        try:
            await fn(self)
        except Exception:
            log.exception("service failed; not restarted")
        finally:
            self._services.discard(label)

    async def submit(
        self, op: Operation, *, priority: int = 0, depends_on: Sequence[int] = (), parent_id: int | None = None
    ) -> int:
        """Validate ``op`` and queue it; returns the job id.

        ``priority``: -20 (first) … 19 (last), like Ganeti and ``nice``.
        ``depends_on``: job ids that must be final first; if one did not
        succeed this job fails with the reason. An invalid operation raises
        :class:`InvalidOperation` and nothing is stored.
        """
        if self._tg is None or self._closing:
            raise EngineError("the engine is not open")
        if not isinstance(op, Operation):
            raise InvalidOperation(f"submit needs an Operation, not {type(op).__name__}")
        if not isinstance(priority, int) or isinstance(priority, bool) or not PRIORITY_MIN <= priority <= PRIORITY_MAX:
            raise InvalidOperation(f"priority must be an int in {PRIORITY_MIN}..{PRIORITY_MAX}, not {priority!r}")
        deps = tuple(depends_on)
        if any(not isinstance(d, int) or isinstance(d, bool) for d in deps):
            raise InvalidOperation(f"depends_on must be job ids (ints), not {deps!r}")
        workflow_for(self.workflows, op.kind)
        inventory = await self._inventory()
        op.validate(inventory, self.node_names)
        owner = self._owner
        self._pending_submits += 1
        try:
            job, event = await shielded(
                self.store.create_job(op, priority=priority, depends_on=deps, parent_id=parent_id, now=self.clock())
            )
        except JobNotFound as err:
            raise InvalidOperation(f"depends_on: {err}") from err
        finally:
            self._pending_submits -= 1
        self._rec.publish(event)
        if not (owner and self._owner):
            # A client: the owner picks the job up from the store (or this engine does, once it owns).
            self.log.info("job submitted to the owner of the store", job_id=job.id, op=op.kind, summary=op.summary())
            return job.id
        handle = JobHandle(id=job.id, op=op, state=JobState.QUEUED, priority=priority, depends_on=deps, parent_id=parent_id)
        self._handles[job.id] = handle
        self.log.info("job submitted", job_id=job.id, op=op.kind, summary=op.summary(), priority=priority)
        self._tg.start_soon(self._job_main, handle)
        return job.id

    async def get(self, job_id: int) -> Job:
        """The job as stored, with its steps."""
        return await self.store.get_job(job_id)

    async def list(self, state: JobState | Iterable[JobState] | None = None, *, limit: int | None = None) -> list[Job]:
        """Jobs (without steps), optionally only in ``state`` (one or several)."""
        states = [state] if isinstance(state, (JobState, str)) else state
        return await self.store.list_jobs(states=None if states is None else [JobState(s) for s in states], limit=limit)

    async def watch(self, job_id: int) -> AsyncIterator[Event]:
        """Every event of the job: the past ones, then live ones; ends at a final state."""
        send, recv = anyio.create_memory_object_stream[Event](math.inf)
        subs = self._rec.subscribers.setdefault(job_id, set())
        subs.add(send)
        try:
            last = 0
            for event in await self.store.events(job_id):
                yield event
                last = event.seq
                if _is_final_event(event):
                    return
            if job_id not in self._handles:
                # Not driven here: final already, or driven by another engine (follow the store).
                while True:
                    job = await self.store.get_job(job_id, steps=False)
                    for event in await self.store.events(job_id, after=last):
                        yield event
                        last = event.seq
                        if _is_final_event(event):
                            return
                    if job.final:
                        return
                    await anyio.sleep(self.cancel_poll_interval)
            async with recv:
                async for event in recv:
                    if event.seq <= last:
                        continue
                    last = event.seq
                    yield event
                    if _is_final_event(event):
                        return
        finally:
            subs.discard(send)
            if not subs:
                self._rec.subscribers.pop(job_id, None)
            send.close()
            recv.close()

    async def watch_cluster(self) -> AsyncIterator[Event]:
        """Cluster events (nodes going offline/online, inventory), live only."""
        send, recv = anyio.create_memory_object_stream[Event](math.inf)
        subs = self._rec.subscribers.setdefault(None, set())
        subs.add(send)
        try:
            async with recv:
                async for event in recv:
                    yield event
        finally:
            subs.discard(send)
            send.close()

    async def wait(self, job_id: int) -> Job:
        """Wait until the job is final; returns it with its steps."""
        handle = self._handles.get(job_id)
        if handle is not None:
            await handle.done.wait()
        else:
            job = await self.store.get_job(job_id, steps=False)
            if not job.final:
                async for _ in self.watch(job_id):
                    pass
        return await self.store.get_job(job_id)

    async def cancel(self, job_id: int, reason: str = "cancelled by operator", *, wait: bool = True) -> JobState:
        """Cancel a job; returns the state it reached (final, when ``wait``).

        Queued and waiting jobs are cancelled at once. A running job records
        the reason, then its step in progress is cancelled (on the node too),
        its compensation runs, and it ends ``cancelled``. After the
        workflow's point of no return the job finishes forward and its result
        says the cancel came too late. Children are cancelled with the parent.
        """
        if not isinstance(reason, str) or not reason.strip():
            raise InvalidOperation(f"a cancel needs a reason, not {reason!r}")
        job, event = await shielded(self.store.request_cancel(job_id, reason, now=self.clock()))
        if event is not None:
            self._rec.publish(event)
        handle = self._handles.get(job_id)
        if handle is None:
            return job.state
        await self._apply_cancel(handle, job.cancel_reason or reason)
        if not wait:
            return handle.state
        await handle.done.wait()
        return (await self.store.get_job(job_id, steps=False)).state

    async def _apply_cancel(self, handle: JobHandle, reason: str) -> None:
        """Obey a cancel already persisted in the store (asked here or by another process)."""
        if handle.cancel_reason is not None:
            return  # already obeyed (the first reason wins)
        handle.cancel_reason = reason
        job_id = handle.id
        log = self.log.bind(job_id=job_id, op=handle.op.kind)
        if handle.recovering:
            log.warning("cancel recorded; the job is being recovered and will settle from the nodes' state")
        elif handle.ponr is not None:
            log.warning("cancel arrived after the point of no return; the job completes", reason=reason)
            self._rec.publish(await shielded(self.store.add_event(job_id, "cancel-too-late", {"reason": reason, "point_of_no_return": handle.ponr}, now=self.clock())))
        elif handle.scope is not None:
            log.info("cancelling job", reason=reason, state=handle.state.value)
            handle.scope.cancel()
        for child in list(handle.children):
            if child in self._handles:
                await self.cancel(child, f"parent job {job_id} cancelled: {reason}", wait=False)

    async def _cancel_watcher(self) -> None:
        """Obey cancel requests other processes (``herd cancel``) write to the store.

        Polls one indexed query every ``cancel_poll_interval`` s (anyio's
        clock); a request for a job this engine drives goes through the same
        path as a local :meth:`cancel`. A queued/waiting job no engine drives
        is cancelled in the store.
        """
        while True:
            await anyio.sleep(self.cancel_poll_interval)
            try:
                if self._owner and not self._draining and not self._pending_submits:
                    # Jobs other processes (clients) wrote for this owner. Skipped while a local
                    # submit is between its store write and its handle (it would be seen twice).
                    new = await self.store.jobs_after(self._last_job_id)
                    if new and not self._pending_submits:
                        self._last_job_id = max(self._last_job_id, new[-1].id)
                        await self._take(new)
                requests = await self.store.cancel_requests(after=self._cancel_seq)
            except EngineError as err:
                self.log.warning("cannot read the store's new jobs and cancel requests", error=str(err))
                continue
            for req in requests:
                self._cancel_seq = max(self._cancel_seq, req.seq)
                handle = self._handles.get(req.job_id)
                if handle is not None:
                    if handle.cancel_reason is None:
                        self.log.info("cancel requested by another process", job_id=req.job_id, reason=req.reason)
                        # The requester's event, for this engine's watchers (written in its process).
                        for ev in await self.store.events(req.job_id):
                            if ev.kind == "cancel-requested":
                                self._rec.publish(ev)
                    await self._apply_cancel(handle, req.reason)
                elif self._owner:
                    for ev in await shielded(self.store.cancel_pending_job(req.job_id, now=self.clock())):
                        self._rec.publish(ev)

    async def instance(self, name: str) -> InstanceRecord:
        """The inventory record of ``name``."""
        record = (await self._inventory()).get(name)
        if record is None:
            raise InstanceNotKnown(f"no instance {name!r} in the inventory")
        return record

    async def instances(self) -> dict[str, InstanceRecord]:
        return dict(await self._inventory())

    async def add_instance(self, spec: hv.Instance, primary: str, *, admin_state: str = "down") -> InstanceRecord:
        """Add an instance to the inventory (set-up; validated like an operation)."""
        from ._cluster import instance_from_table

        if primary not in self.node_names:
            raise InvalidOperation(f"add_instance {spec.name}: unknown node {primary!r}")
        table = {**msgspec.to_builtins(spec), "primary": primary, "admin_state": admin_state}
        table.pop("name", None)
        record = instance_from_table(spec.name, table, where="add_instance")
        from .errors import StoreError

        try:
            await self.store.add_instance(record, now=self.clock())
        except StoreError as err:
            raise InvalidOperation(f"add_instance: {err}") from err
        finally:
            self._inventory_changed()
        return record

    async def remove_instance(self, name: str) -> None:
        """Remove an instance from the inventory (refused while a job holds it)."""
        for handle in self._handles.values():
            if any(r.level == "instance" and r.name == name for r in handle.locks):
                raise InvalidOperation(f"remove_instance: job {handle.id} is using instance {name!r}")
        try:
            await self.store.remove_instance(name, now=self.clock())
        finally:
            self._inventory_changed()

    def nodes(self) -> list[NodeStatus]:
        """Each node's health as last seen by the pinger."""
        return self._nodes.statuses()

    def locks(self) -> dict[str, list[int]]:
        """Held locks and their owners (diagnostics)."""
        return self._sched.locks.snapshot()

    # --- the job's life -----------------------------------------------------

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
            inventory=_EngineInventory(self),
            jobs=_EngineJobs(self, h),
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



async def _busy_message(store: Store) -> str:
    """"another engine runs jobs from STORE: pid N since T (role)" for :class:`EngineBusy`."""
    who = await store.owner() or {}
    since = who.get("since")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if isinstance(since, (int, float)) else ""
    host = f" on {who['host']}" if who.get("host") and who.get("host") != socket.gethostname() else ""
    role = f" ({who['role']})" if who.get("role") else ""
    return f"another engine runs jobs from {getattr(store, 'path', store)}: pid {who.get('pid', '?')}{host}{when}{role}; stop it or submit to it"


def _is_final_event(event: Event) -> bool:
    if event.kind != "state":
        return False
    try:
        return JobState(event.data.get("state")).final
    except ValueError:
        return False


class _EngineInventory:
    """``ctx.inventory``: reads of the engine's (cached) inventory."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def instance(self, name: str) -> InstanceRecord:
        return await self._engine.instance(name)

    async def all(self) -> dict[str, InstanceRecord]:
        return await self._engine.instances()


class _EngineJobs:
    """``ctx.jobs``: children of one job, and waiting on jobs."""

    def __init__(self, engine: Engine, handle: JobHandle) -> None:
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
