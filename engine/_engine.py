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

from ._cluster import Cluster, load_cluster
from ._health import NodeHealth, NodeStatus
from ._inventory import InstanceRecord
from ._jobs import Job, JobState
from ._locks import normalise
from ._log import configure_logging, get_logger
from ._ops import Operation
from ._optable import BUILTIN_OPERATIONS
from ._policy import DEFAULT_POLICY, MigrationPolicy
from ._recorder import JobHandle, Recorder, shielded
from ._scheduler import Scheduler, safe_migration_nodes
from ._seam import Clock, Service, ServiceView, SystemClock
from ._store import SqliteStore, Store
from ._workflow import Workflow, check_workflows, workflow_for
from ._runner import JobRunner
from ._follow import JobFollowing
from .workflows import BUILTIN_SERVICES, BUILTIN_WORKFLOWS
from .errors import EngineBusy, EngineError, InstanceNotKnown, InvalidOperation, JobNotFound

PRIORITY_MIN, PRIORITY_MAX = -20, 19


class Engine(JobRunner, JobFollowing):
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
        """Run ``async fn(host)`` until the engine closes (the ``services`` table
        given to :meth:`open` is started by the owner). ``host`` is a
        :class:`engine._seam.ServiceView` of this engine. Once per name."""
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
            await fn(ServiceView(self))
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

async def _busy_message(store: Store) -> str:
    """"another engine runs jobs from STORE: pid N since T (role)" for :class:`EngineBusy`."""
    who = await store.owner() or {}
    since = who.get("since")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if isinstance(since, (int, float)) else ""
    host = f" on {who['host']}" if who.get("host") and who.get("host") != socket.gethostname() else ""
    role = f" ({who['role']})" if who.get("role") else ""
    return f"another engine runs jobs from {getattr(store, 'path', store)}: pid {who.get('pid', '?')}{host}{when}{role}; stop it or submit to it"
