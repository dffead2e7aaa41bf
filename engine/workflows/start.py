"""StartInstance: startup memory from the node's free memory, start, prove it runs."""

from __future__ import annotations

from typing import Any

import msgspec

import hv

from transport.errors import NodeUnreachable

from .._inventory import AddPendingCleanup, AdminState, SetAdminState
from .._ops import StartInstance
from .._workflow import Context, Outcome, Workflow
from ..errors import StepFailed
from ._util import as_type, instance_info, is_running


class StartWorkflow(Workflow[StartInstance]):
    OP = StartInstance
    COMPENSATION_TIMEOUT = 90.0

    async def _target(self, ctx: Context) -> tuple[str, hv.Instance]:
        record = await ctx.inventory.instance(self.op.instance)
        spec = record.spec
        if self.op.hvparams:
            spec = msgspec.structs.replace(spec, hvparams={**spec.hvparams, **self.op.hvparams})
        return record.primary, spec

    async def run(self, ctx: Context) -> Any:
        node, spec = await self._target(ctx)
        up = [SetAdminState(instance=spec.name, state=AdminState.UP)]
        info = instance_info(await ctx.nodes.call(node, idempotent=True, step="check-state").get_instance_info(spec.name))
        if is_running(info):
            await ctx.journal.set_admin_state(spec.name, AdminState.UP)
            return {"node": node, "already_running": True}
        memory = await ctx.nodes.call(node, idempotent=True, step="startup-memory").instance_startup_memory(spec)
        node_info = as_type(await ctx.nodes.call(node, idempotent=True, step="node-memory").get_node_info(), hv.NodeInfo, what="get_node_info")
        if node_info.memory_free < spec.beparams.minmem:
            raise StepFailed(
                f"node {node} has {node_info.memory_free} MiB free, less than {spec.name}'s minmem of {spec.beparams.minmem} MiB",
                step="node-memory",
                node=node,
            )
        await ctx.nodes.call(node, step="start").start_instance(spec, startup_paused=self.op.startup_paused)
        info = instance_info(
            await ctx.nodes.call(node, idempotent=True, step="prove-running", inventory=up).get_instance_info(spec.name)
        )
        if not is_running(info):
            raise StepFailed(f"{spec.name} was started on {node} but is not running there (found {info})", step="prove-running", node=node)
        assert info is not None
        return {"node": node, "memory": int(memory), "state": hv.HvInstanceState(info.state).value}

    async def compensate(self, ctx: Context, reason: str) -> None:
        if ctx.journal.last("start") is None:
            return  # nothing was started
        node, spec = await self._target(ctx)
        # The start may have gone through on the node before the cancel did.
        try:
            await ctx.nodes.call(node, step="compensate-stop", deadline=60.0).stop_instance(spec, force=True, retry=True)
        except NodeUnreachable as err:
            # Unknown whether it runs there: say so for Reconcile, then fail.
            await ctx.journal.commit(
                "compensate-pending-cleanup",
                [AddPendingCleanup(instance=spec.name, node=node, reason=f"start of job {ctx.job_id} interrupted; node unreachable: {err}")],
            )
            raise
        await ctx.journal.set_admin_state(spec.name, AdminState.DOWN, step="compensate-admin-down")

    async def recover(self, ctx: Context) -> Outcome:
        node, spec = await self._target(ctx)
        info = instance_info(await ctx.nodes.call(node, idempotent=True, step="recover-check").get_instance_info(spec.name))
        running = is_running(info)
        if ctx.cancel_reason is not None:
            if running and ctx.journal.last("start") is not None:
                await self.compensate(ctx, ctx.cancel_reason)
            return Outcome.cancelled(ctx.cancel_reason, {"node": node, "running": False})
        if running:
            await ctx.journal.set_admin_state(spec.name, AdminState.UP, step="recover-admin-up")
            return Outcome.succeeded({"node": node, "state": hv.HvInstanceState(info.state).value})  # type: ignore[union-attr]
        await ctx.journal.set_admin_state(spec.name, AdminState.DOWN, step="recover-admin-down")
        return Outcome.failed(
            StepFailed(f"the engine stopped during the start; {spec.name} is not running on {node}", step="start", node=node)
        )
