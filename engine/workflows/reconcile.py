"""Reconciliation: ask the nodes where an instance really is, and settle it.

Ganeti's manual ``gnt-instance migrate --cleanup``, made automatic. One
algorithm, :func:`settle`, serves the migration's rollback, crash recovery
of a migration job, the ``Reconcile`` operation and the pending-cleanup
janitor. It observes each relevant node (the instance's state there and any
migration state), aborts an orphaned migration, then decides from evidence
only:

* one copy running → it wins: leftovers elsewhere (an incoming target, a
  migrated-away source, a paused duplicate) are cleaned, the inventory
  points at it;
* none running, a completed incoming copy whose source is finished or gone
  → finish the migration forward (the copy is resumed);
* none running, a paused source whose migration failed → resume it;
* two running → the copy the inventory does not own is stopped only when
  the owner's copy is proven running; otherwise a loud ``alarm`` event and
  nothing is fenced blindly;
* nowhere → the instance is marked down, with the evidence;
* a node that cannot be asked, when the answer matters → ``pending``: the
  caller retries later (never a guess).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio

import hv
from transport.errors import CallTimeout, NodeUnreachable, TransportError

from .._inventory import AddPendingCleanup, AdminState, ClearPendingCleanup, InventoryChange, SetAdminState, SetPrimary
from .._jobs import JobState
from .._ops_migration import Reconcile
from .._seam import ServiceHost
from .._workflow import Context, Outcome, Workflow
from ..errors import EngineError, RecoveryPending, StepFailed, StepTimeout
from ._util import as_type, instance_info

#: Seconds one observation of a node may take (retries included).
OBSERVE_DEADLINE = 5.0
#: Seconds one corrective action may take.
ACT_DEADLINE = 60.0
_ACTIVE = frozenset({"setup", "active", "device", "pre-switchover", "cancelling", "postcopy-active"})
_UNREACHABLE = (NodeUnreachable, CallTimeout, StepTimeout, TransportError, TimeoutError)


class Copy(str, enum.Enum):
    """What a node holds of the instance."""

    ABSENT = "absent"
    RUNNING = "running"
    PAUSED = "paused"
    INCOMING = "incoming"  # a migration target still receiving
    RECEIVED = "received"  # a migration target that has it all, not yet resumed
    MIGRATED = "migrated"  # a migration source whose copy completed (postmigrate)
    SHUTDOWN = "shutdown"
    UNKNOWN = "unknown"  # the node could not be asked


class ReconcileFailed(StepFailed):
    """The nodes' state cannot be settled safely: ``outcome`` is "split-brain" or "pending"."""

    def __init__(self, message: str, *, outcome: str, step: str | None = None, node: str | None = None) -> None:
        super().__init__(message, step=step, node=node)
        self.outcome = outcome


@dataclass
class NodeView:
    """One node's answer about one instance."""

    node: str
    copy: Copy
    info: hv.InstanceInfo | None = None
    migration: hv.MigrationStatus | None = None
    error: str | None = None

    @property
    def migrating(self) -> bool:
        return self.migration is not None and self.migration.status in _ACTIVE

    @property
    def migration_failed(self) -> bool:
        return self.migration is not None and self.migration.status in ("failed", "cancelled")

    def evidence(self) -> dict[str, Any]:
        data: dict[str, Any] = {"copy": self.copy.value}
        if self.info is not None:
            data["state"] = hv.HvInstanceState(self.info.state).value
            if self.info.runstate:
                data["runstate"] = self.info.runstate
        if self.migration is not None:
            data["migration"] = self.migration.status
        if self.error:
            data["error"] = self.error
        return data


@dataclass
class Settlement:
    """Where the instance ended, and what it took."""

    outcome: str  # "running" | "down" | "pending" | "split-brain"
    winner: str | None
    views: dict[str, NodeView]
    actions: list[str] = field(default_factory=list)
    message: str = ""

    def evidence(self) -> dict[str, Any]:
        return {n: v.evidence() for n, v in self.views.items()}

    def as_result(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "node": self.winner, "actions": list(self.actions), "evidence": self.evidence()}


def classify(info: hv.InstanceInfo | None, migration: hv.MigrationStatus | None) -> Copy:
    """A node's copy from its instance info and migration status."""
    if info is None:
        return Copy.ABSENT
    state = hv.HvInstanceState(info.state)
    if state is hv.HvInstanceState.INCOMING:
        return Copy.INCOMING
    if state is hv.HvInstanceState.SHUTDOWN:
        return Copy.SHUTDOWN
    if state is hv.HvInstanceState.RUNNING:
        return Copy.RUNNING
    if info.runstate == "postmigrate":
        return Copy.MIGRATED
    if migration is not None and migration.status == "completed":
        return Copy.RECEIVED
    return Copy.PAUSED


async def observe(ctx: Context, spec: hv.Instance, node: str, prefix: str) -> NodeView:
    """Ask ``node`` about ``spec`` (journaled reads); UNKNOWN when it cannot answer.

    One attempt each: a node that does not answer is marked offline by the
    engine (and probed until it is back); the caller then settles as
    pending rather than waiting here.
    """
    try:
        raw = await ctx.nodes.call(node, deadline=OBSERVE_DEADLINE, step=f"{prefix}-observe").get_instance_info(spec.name)
        info = instance_info(raw)
    except _UNREACHABLE as err:
        return NodeView(node, Copy.UNKNOWN, error=f"{type(err).__name__}: {err}")
    except hv.HypervisorError as err:
        return NodeView(node, Copy.UNKNOWN, error=f"{type(err).__name__}: {err}")
    migration = None
    if info is not None and hv.HvInstanceState(info.state) is not hv.HvInstanceState.INCOMING:
        try:
            raw = await ctx.nodes.call(node, deadline=OBSERVE_DEADLINE, step=f"{prefix}-migration-status").get_migration_status(spec)
            migration = as_type(raw, hv.MigrationStatus, what="get_migration_status")
        except _UNREACHABLE as err:
            return NodeView(node, Copy.UNKNOWN, info=info, error=f"{type(err).__name__}: {err}")
        except hv.HypervisorError:
            migration = None  # no migration state to report (or not supported)
    return NodeView(node, classify(info, migration), info, migration)


class _Settler:
    """One settlement: observations, actions (each a journaled step), the decision."""

    def __init__(self, ctx: Context, spec: hv.Instance, owner: str, prefix: str, optional: Iterable[str] = ()) -> None:
        self.optional = set(optional)
        self.ctx = ctx
        self.spec = spec
        self.owner = owner
        self.prefix = prefix
        self.views: dict[str, NodeView] = {}
        self.actions: list[str] = []

    async def look(self, node: str) -> NodeView:
        view = await observe(self.ctx, self.spec, node, self.prefix)
        if view.copy is Copy.UNKNOWN and node in self.optional:
            # A node asked only in case: it cannot answer, so it is left out (noted).
            self.views.pop(node, None)
            self.actions.append(f"{node} not asked: {view.error}")
            return view
        self.views[node] = view
        return view

    async def act(
        self, node: str, what: str, action: Callable[[hv.BaseHypervisor], Awaitable[Any]], *, inventory: Iterable[InventoryChange] = ()
    ) -> bool:
        """One corrective call (a journaled step ``PREFIX-WHAT``); True when it succeeded (failures are recorded, not raised)."""
        try:
            await action(self.ctx.nodes.call(node, step=f"{self.prefix}-{what}", deadline=ACT_DEADLINE, inventory=list(inventory)))
        except (hv.HypervisorError, *_UNREACHABLE) as err:
            self.actions.append(f"{what} on {node} failed: {type(err).__name__}: {err}")
            return False
        self.actions.append(f"{what} on {node}")
        return True

    async def discard(self, view: NodeView, winner: str) -> None:
        """Remove a copy that lost to ``winner``'s proven-running one."""
        node = view.node
        if view.copy in (Copy.INCOMING, Copy.RECEIVED):
            await self.act(node, "discard-incoming", lambda h: h.finalize_migration_dst(self.spec, "", False))
        elif view.copy is Copy.MIGRATED:
            if not await self.act(node, "finalize-migrated-source", lambda h: h.finalize_migration_source(self.spec, True, True)):
                await self.act(node, "stop-leftover", lambda h: h.stop_instance(self.spec, force=True, retry=True))
        elif view.copy in (Copy.PAUSED, Copy.SHUTDOWN, Copy.RUNNING):
            await self.act(node, "stop-duplicate", lambda h: h.stop_instance(self.spec, force=True, retry=True))
        await self.look(node)

    async def run(self, nodes: Iterable[str], *, abort_active: bool) -> Settlement:
        for node in dict.fromkeys(nodes):
            if node in self.optional and not self.ctx.nodes.online(node):
                self.actions.append(f"{node} not asked: offline")
                continue
            await self.look(node)
        if abort_active:
            for view in list(self.views.values()):
                if view.copy in (Copy.RUNNING, Copy.PAUSED) and view.migrating:
                    await self.act(view.node, "cancel-migration", lambda h: h.cancel_migration(self.spec))
                    await self.look(view.node)
        views = self.views
        unknown = [v for v in views.values() if v.copy is Copy.UNKNOWN]
        running = [v for v in views.values() if v.copy is Copy.RUNNING]

        if len(running) >= 2:
            owner = views.get(self.owner)
            if owner is None or owner.copy is not Copy.RUNNING:
                return self._settled(
                    "split-brain", None,
                    f"{self.spec.name} runs on {', '.join(v.node for v in running)}, none of them its primary {self.owner}: fencing nothing",
                )
            for view in running:
                if view.node != self.owner:
                    await self.discard(view, self.owner)
            still = [v.node for v in self.views.values() if v.copy is Copy.RUNNING and v.node != self.owner]
            if still:
                return self._settled("split-brain", None, f"{self.spec.name} still runs on {', '.join(still)} besides {self.owner}")
            return await self._finish(self.owner)

        if len(running) == 1:
            winner = running[0]
            for view in list(views.values()):
                if view.node != winner.node and view.copy not in (Copy.ABSENT, Copy.UNKNOWN):
                    await self.discard(view, winner.node)
            if winner.migration_failed:
                await self.act(winner.node, "finalize-source-rollback", lambda h: h.finalize_migration_source(self.spec, False, True))
            return await self._finish(winner.node)

        received = [v for v in views.values() if v.copy is Copy.RECEIVED]
        paused_sources = [v for v in views.values() if v.copy is Copy.PAUSED and (v.migration_failed or v.migrating)]
        paused = [v for v in views.values() if v.copy is Copy.PAUSED]
        migrated = [v for v in views.values() if v.copy is Copy.MIGRATED]

        if paused_sources:
            # A source whose migration failed (or was just cancelled) takes the instance back.
            source = next((v for v in paused_sources if v.node == self.owner), paused_sources[0])
            for view in list(views.values()):
                if view.node != source.node and view.copy in (Copy.INCOMING, Copy.RECEIVED):
                    await self.discard(view, source.node)
            await self.act(source.node, "finalize-source-rollback", lambda h: h.finalize_migration_source(self.spec, False, True))
            view = await self.look(source.node)
            if view.copy is Copy.RUNNING or view.copy is Copy.PAUSED:
                return await self._finish(source.node)
            return self._settled("pending", None, f"{self.spec.name}: the source {source.node} did not resume ({view.copy.value})")

        if received:
            if unknown:
                return self._settled(
                    "pending", None,
                    f"{self.spec.name} was received completely on {received[0].node}, but {', '.join(v.node for v in unknown)} "
                    "cannot be asked whether the source resumed: not finishing blindly",
                )
            target = received[0]
            ok = await self.act(target.node, "finalize-target", lambda h: h.finalize_migration_dst(self.spec, "", True), inventory=[SetPrimary(instance=self.spec.name, node=target.node)])
            view = await self.look(target.node)
            if not ok or view.copy is not Copy.RUNNING:
                return self._settled("pending", None, f"{self.spec.name}: finishing the migration on {target.node} failed ({view.copy.value})")
            for other in migrated:
                await self.discard(other, target.node)
            return await self._finish(target.node)

        if paused:
            home = next((v for v in paused if v.node == self.owner), paused[0])
            if len(paused) > 1:
                return self._settled("split-brain", None, f"{self.spec.name} is paused on {', '.join(v.node for v in paused)}: fencing nothing")
            for view in list(views.values()):
                if view.node != home.node and view.copy in (Copy.INCOMING, Copy.RECEIVED):
                    await self.discard(view, home.node)
            return await self._finish(home.node)

        if unknown:
            return self._settled(
                "pending", None,
                f"{self.spec.name} runs on none of the reachable nodes; {', '.join(v.node for v in unknown)} cannot be asked",
            )
        # Nowhere running: clean incoming leftovers, then mark it down with the evidence.
        for view in list(views.values()):
            if view.copy in (Copy.INCOMING,):
                await self.discard(view, "")
        return await self._down(migrated)

    def _settled(self, outcome: str, winner: str | None, message: str) -> Settlement:
        return Settlement(outcome, winner, dict(self.views), list(self.actions), message)

    async def pending(self, settlement: Settlement) -> None:
        """Unprovable: record a pending cleanup on each node that could not be asked."""
        record = await self.ctx.inventory.instance(self.spec.name)
        pending_nodes = {p.node for p in record.pending_cleanup}
        changes: list[InventoryChange] = [
            AddPendingCleanup(instance=self.spec.name, node=v.node, reason=f"could not be asked while reconciling: {v.error}")
            for v in settlement.views.values()
            if v.copy is Copy.UNKNOWN and v.node not in pending_nodes
        ]
        if changes:
            await self.ctx.journal.commit(f"{self.prefix}-pending", changes, message=settlement.message)

    async def _finish(self, winner: str) -> Settlement:
        record = await self.ctx.inventory.instance(self.spec.name)
        changes: list[InventoryChange] = []
        if record.primary != winner:
            changes.append(SetPrimary(instance=self.spec.name, node=winner))
        if record.admin_state is not AdminState.UP:
            changes.append(SetAdminState(instance=self.spec.name, state=AdminState.UP))
        changes.extend(self._cleanup_changes(record.pending_cleanup, winner))
        settlement = self._settled("running", winner, f"{self.spec.name} runs on {winner}")
        await self.ctx.journal.commit(f"{self.prefix}-settled", changes, **settlement.as_result())
        return settlement

    async def _down(self, migrated: list[NodeView]) -> Settlement:
        record = await self.ctx.inventory.instance(self.spec.name)
        why = "runs on no node"
        if migrated:
            why = f"is paused after a completed migration on {', '.join(v.node for v in migrated)} and no target holds it"
        changes: list[InventoryChange] = [SetAdminState(instance=self.spec.name, state=AdminState.DOWN)]
        changes.extend(self._cleanup_changes(record.pending_cleanup))
        settlement = self._settled("down", None, f"{self.spec.name} {why}: marked down")
        await self.ctx.journal.event("alarm" if migrated else "instance-down", instance=self.spec.name, message=settlement.message, evidence=settlement.evidence())
        await self.ctx.journal.commit(f"{self.prefix}-settled", changes, **settlement.as_result())
        return settlement

    def _cleanup_changes(self, pending: Iterable[Any], winner: str | None = None) -> list[InventoryChange]:
        """Pending cleanups: clear those proven clean (or the winner), add those that cannot be asked."""
        changes: list[InventoryChange] = []
        pending_nodes = {p.node for p in pending}
        for view in self.views.values():
            if view.copy is Copy.UNKNOWN and view.node not in pending_nodes:
                changes.append(
                    AddPendingCleanup(instance=self.spec.name, node=view.node, reason=f"unreachable while reconciling: {view.error}")
                )
            elif (view.copy is Copy.ABSENT or view.node == winner) and view.node in pending_nodes:
                changes.append(ClearPendingCleanup(instance=self.spec.name, node=view.node))
        return changes


async def settle(
    ctx: Context, spec: hv.Instance, nodes: Iterable[str], *, owner: str, prefix: str = "reconcile",
    abort_active: bool = True, optional: Iterable[str] = (),
) -> Settlement:
    """Observe ``nodes``, act on the evidence, record the result (see the module doc).

    ``optional``: nodes asked only in case (skipped when they cannot answer).
    Emits a ``reconcile`` event with every node's evidence, and an ``alarm``
    event for a split brain.
    """
    settler = _Settler(ctx, spec, owner, prefix, optional)
    settlement = await settler.run(nodes, abort_active=abort_active)
    if settlement.outcome == "pending":
        await settler.pending(settlement)
    await ctx.journal.event("reconcile", instance=spec.name, prefix=prefix, **settlement.as_result(), message=settlement.message)
    if settlement.outcome == "split-brain":
        ctx.log.error("split brain", instance=spec.name, message=settlement.message, evidence=settlement.evidence())
        await ctx.journal.event("alarm", alarm="split-brain", instance=spec.name, message=settlement.message, evidence=settlement.evidence())
    return settlement


class ReconcileWorkflow(Workflow[Reconcile]):
    """The ``Reconcile`` operation: settle one instance from the nodes' real state."""

    OP = Reconcile
    COMPENSATION_TIMEOUT = 120.0

    async def run(self, ctx: Context) -> Any:
        record = await ctx.inventory.instance(self.op.instance)
        required = [record.primary, *(p.node for p in record.pending_cleanup), *self.op.nodes]
        others = [] if self.op.nodes else [n for n in ctx.nodes.names if n not in required]
        settlement = await settle(ctx, record.spec, [*required, *others], owner=record.primary, prefix="reconcile", optional=others)
        if settlement.outcome in ("pending", "split-brain"):
            raise ReconcileFailed(f"reconcile {self.op.instance}: {settlement.message}", outcome=settlement.outcome, step="reconcile-settled")
        return settlement.as_result()

    async def recover(self, ctx: Context) -> Outcome:
        # Reconciling is idempotent by construction: do it again from the nodes.
        if ctx.cancel_reason is not None:
            return Outcome.cancelled(ctx.cancel_reason)
        try:
            return Outcome.succeeded(await self.run(ctx))
        except ReconcileFailed as exc:
            if exc.outcome == "pending":
                raise RecoveryPending(str(exc)) from exc
            return Outcome.failed(exc)


# --- the pending-cleanup janitor ----------------------------------------------


async def _submit_reconciles(engine: ServiceHost, node: str | None) -> list[int]:
    """A Reconcile job for each instance with pending cleanup (on ``node``), unless one is queued."""
    from .._ops_migration import Reconcile as ReconcileOp

    active = await engine.list(state=[JobState.QUEUED, JobState.WAITING, JobState.RUNNING])
    busy = {getattr(j.op, "instance", None) for j in active if j.kind == ReconcileOp.__struct_config__.tag}
    submitted = []
    for name, record in (await engine.instances()).items():
        nodes = {p.node for p in record.pending_cleanup}
        if not nodes or name in busy or (node is not None and node not in nodes):
            continue
        if not all(engine.node_online(n) for n in nodes | {record.primary}):
            continue
        try:
            submitted.append(await engine.submit(ReconcileOp(instance=name)))
        except EngineError as err:
            engine.log.warning("cannot submit the pending cleanup", instance=name, error=str(err))
    return submitted


async def pending_cleanup_janitor(engine: ServiceHost, rescan: float = 30.0) -> None:
    """Clean what migrations left on unreachable nodes when those nodes come back.

    An engine service (in :data:`engine.workflows.BUILTIN_SERVICES`: started
    by every owner engine, so cleanups left by an earlier session are handled
    at once). It sees the engine only as a :class:`engine._seam.ServiceHost`. At start, on every
    ``node-online`` event, and every ``rescan`` s, a ``Reconcile`` job is
    submitted for each instance with a pending cleanup on a node that is
    online. Runs until the engine closes.
    """
    send, recv = anyio.create_memory_object_stream[str](math.inf)

    async def follow() -> None:
        with send:
            async for event in engine.watch_cluster():
                if event.kind == "node-online":
                    send.send_nowait(str(event.data.get("node")))

    async with anyio.create_task_group() as tg:
        tg.start_soon(follow)
        with recv:
            await _submit_reconciles(engine, None)
            while True:
                node: str | None = None
                with anyio.move_on_after(rescan):
                    try:
                        node = await recv.receive()
                    except anyio.EndOfStream:
                        break  # the engine closed its event streams
                with anyio.CancelScope(shield=True):
                    await _submit_reconciles(engine, node)
        tg.cancel_scope.cancel()
