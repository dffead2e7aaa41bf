"""Failover: start an instance on another node because its primary is down.

Only when the primary is unreachable now *and* the operator confirmed it is
down (``Failover(primary_down=True)``; validated at submit). The start on
the target carries the inventory change (primary → target) and a pending
cleanup on the old primary in the same transaction: if that node comes back
with a stale copy, the pending-cleanup reconcile stops it — because the copy
on the target is then proven running.
"""

from __future__ import annotations

from typing import Any

import hv
from transport.errors import CallTimeout, NodeUnreachable, TransportError

from .._inventory import AddPendingCleanup, AdminState, SetAdminState, SetPrimary
from .._ops_migration import Failover
from .._workflow import Context, Outcome, Workflow
from ..errors import StepFailed, StepTimeout
from ._util import as_type, instance_info, is_running


class FailoverRefused(StepFailed):
    """The failover's preconditions do not hold (the primary answers, the target is busy)."""


class FailoverWorkflow(Workflow[Failover]):
    OP = Failover
    COMPENSATION_TIMEOUT = 90.0

    async def run(self, ctx: Context) -> Any:
        record = await ctx.inventory.instance(self.op.instance)
        spec, old, dst = record.spec, record.primary, self.op.target
        what = f"failover {spec.name} {old} -> {dst}"
        async with ctx.journal.step("plan", args=f"{spec.name}: {old} -> {dst}") as s:
            s.result = {"source": old, "target": dst}
        try:
            await ctx.nodes.ping(old, deadline=5.0, step="confirm-primary-down")
        except (NodeUnreachable, CallTimeout, StepTimeout, TransportError) as err:
            await ctx.journal.event("primary-down", node=old, evidence=f"{type(err).__name__}: {err}", confirmed_by="operator (primary_down=True)")
        else:
            raise FailoverRefused(f"{what}: primary node {old} answers: it is not down (use Migrate)", step="confirm-primary-down", node=old)
        there = instance_info(await ctx.nodes.call(dst, idempotent=True, step="check-target").get_instance_info(spec.name))
        if there is not None:
            raise FailoverRefused(f"{what}: {spec.name} is already present on {dst} ({there.state}); run Reconcile", step="check-target", node=dst)
        node = as_type(await ctx.nodes.call(dst, idempotent=True, step="check-memory").get_node_info(), hv.NodeInfo, what="get_node_info")
        if node.memory_free < spec.beparams.minmem:
            raise FailoverRefused(
                f"{what}: {dst} has {node.memory_free} MiB free, less than {spec.name}'s minmem {spec.beparams.minmem} MiB",
                step="check-memory", node=dst,
            )
        moved = [
            SetPrimary(instance=spec.name, node=dst),
            SetAdminState(instance=spec.name, state=AdminState.UP),
            AddPendingCleanup(instance=spec.name, node=old, reason=f"failed over to {dst} while {old} was down; a stale copy may remain"),
        ]
        await ctx.nodes.call(dst, step="start", inventory=moved).start_instance(spec)
        info = instance_info(await ctx.nodes.call(dst, idempotent=True, step="prove-running").get_instance_info(spec.name))
        if not is_running(info):
            raise StepFailed(f"{what}: started on {dst} but not running there (found {info})", step="prove-running", node=dst)
        return {"instance": spec.name, "source": old, "target": dst, "node": dst, "pending_cleanup": old}

    async def compensate(self, ctx: Context, reason: str) -> None:
        plan = ctx.journal.last("plan")
        if ctx.journal.last("start") is None or plan is None:
            return
        dst = str(plan.result["target"])
        record = await ctx.inventory.instance(self.op.instance)
        await ctx.nodes.call(dst, step="compensate-stop", deadline=60.0).stop_instance(record.spec, force=True, retry=True)
        await ctx.journal.set_admin_state(record.spec.name, AdminState.DOWN, step="compensate-admin-down")

    async def recover(self, ctx: Context) -> Outcome:
        plan = ctx.journal.last("plan")
        if plan is None or ctx.journal.last("start") is None:
            if ctx.cancel_reason is not None:
                return Outcome.cancelled(ctx.cancel_reason)
            return Outcome.failed(StepFailed(f"failover {self.op.instance}: the engine stopped before the start; nothing changed"))
        dst, old = str(plan.result["target"]), str(plan.result["source"])
        record = await ctx.inventory.instance(self.op.instance)
        info = instance_info(await ctx.nodes.call(dst, idempotent=True, step="recover-check").get_instance_info(record.spec.name))
        if is_running(info):
            if record.primary != dst:
                await ctx.journal.commit(
                    "recover-moved",
                    [
                        SetPrimary(instance=record.spec.name, node=dst),
                        SetAdminState(instance=record.spec.name, state=AdminState.UP),
                        AddPendingCleanup(instance=record.spec.name, node=old, reason=f"failed over to {dst}; a stale copy may remain"),
                    ],
                )
            return Outcome.succeeded({"instance": record.spec.name, "source": old, "target": dst, "node": dst})
        return Outcome.failed(StepFailed(f"failover {record.spec.name}: the engine stopped during the start; not running on {dst}", node=dst))
