"""StopInstance: the driver's soft→hard escalation; the result says which ended it."""

from __future__ import annotations

from typing import Any

import hv

from transport.errors import NodeUnreachable

from .._inventory import AddPendingCleanup, AdminState, SetAdminState
from .._ops import StopInstance
from .._workflow import Context, Outcome, Workflow
from ..errors import StepFailed
from ._util import as_type, instance_info, is_running


class StopWorkflow(Workflow[StopInstance]):
    OP = StopInstance
    COMPENSATION_TIMEOUT = 60.0

    async def run(self, ctx: Context) -> Any:
        record = await ctx.inventory.instance(self.op.instance)
        node, spec = record.primary, record.spec
        down = [SetAdminState(instance=spec.name, state=AdminState.DOWN)]
        raw = await ctx.nodes.call(node, step="stop", inventory=down).stop_instance(spec, force=self.op.force, retry=True, timeout=self.op.timeout)
        result = as_type(raw, hv.StopResult, what="stop_instance")
        info = instance_info(await ctx.nodes.call(node, idempotent=True, step="prove-stopped").get_instance_info(spec.name))
        if is_running(info):
            raise StepFailed(f"{spec.name} is still there on {node} after the stop (found {info})", step="prove-stopped", node=node)
        stage = hv.StopStage(result.stage)
        return {
            "node": node,
            "stage": stage.value,
            "how": "already-stopped" if stage is hv.StopStage.ALREADY_STOPPED else ("hard" if stage.hard else "soft"),
            "stages": [{"stage": hv.StopStage(t.stage).value, "seconds": t.seconds, "ended_it": t.ended_it} for t in result.stages],
        }

    async def _settle_admin_state(self, ctx: Context, step: str) -> dict[str, Any]:
        """Record the instance's real state (a half-done stop is not undone)."""
        record = await ctx.inventory.instance(self.op.instance)
        info = instance_info(await ctx.nodes.call(record.primary, idempotent=True, step=f"{step}-check").get_instance_info(record.spec.name))
        running = is_running(info)
        await ctx.journal.set_admin_state(record.spec.name, AdminState.UP if running else AdminState.DOWN, step=f"{step}-admin-state")
        return {"node": record.primary, "running": running}

    async def compensate(self, ctx: Context, reason: str) -> None:
        if ctx.journal.last("stop") is None:
            return
        try:
            await self._settle_admin_state(ctx, "compensate")
        except NodeUnreachable as err:
            record = await ctx.inventory.instance(self.op.instance)
            await ctx.journal.commit(
                "compensate-pending-cleanup",
                [AddPendingCleanup(instance=record.name, node=record.primary, reason=f"stop of job {ctx.job_id} interrupted; node unreachable: {err}")],
            )
            raise

    async def recover(self, ctx: Context) -> Outcome:
        if ctx.cancel_reason is not None:
            return Outcome.cancelled(ctx.cancel_reason, await self._settle_admin_state(ctx, "recover"))
        # A stop with retry=True is idempotent by the driver contract, so
        # finishing it forward is a decision, not a guess: the node's answer
        # (already stopped, or stopped now) settles the job.
        try:
            return Outcome.succeeded(await self.run(ctx))
        except Exception as exc:
            if isinstance(exc, (hv.HypervisorError, StepFailed)):
                await self._settle_admin_state(ctx, "recover")
                return Outcome.failed(exc)
            raise
