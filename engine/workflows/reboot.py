"""RebootInstance: soft (the hypervisor's reboot) or hard (forced stop, then start)."""

from __future__ import annotations

from typing import Any

import hv

from .._inventory import AdminState, SetAdminState
from .._ops import RebootInstance, RebootType
from .._workflow import Context, Outcome, Workflow
from ..errors import StepFailed
from ._util import instance_info, is_running


class RebootWorkflow(Workflow[RebootInstance]):
    OP = RebootInstance
    COMPENSATION_TIMEOUT = 120.0

    async def run(self, ctx: Context) -> Any:
        record = await ctx.inventory.instance(self.op.instance)
        node, spec = record.primary, record.spec
        up = [SetAdminState(instance=spec.name, state=AdminState.UP)]
        info = instance_info(await ctx.nodes.call(node, idempotent=True, step="check-state").get_instance_info(spec.name))
        if not is_running(info):
            raise StepFailed(f"{spec.name} is not running on {node}: there is nothing to reboot", step="check-state", node=node)
        if RebootType(self.op.reboot_type) is RebootType.SOFT:
            await ctx.nodes.call(node, step="reboot").reboot_instance(spec)
        else:
            await ctx.nodes.call(node, step="stop").stop_instance(spec, force=True, retry=True, timeout=self.op.timeout)
            await ctx.nodes.call(node, step="start").start_instance(spec)
        info = instance_info(await ctx.nodes.call(node, idempotent=True, step="prove-running", inventory=up).get_instance_info(spec.name))
        if not is_running(info):
            raise StepFailed(f"{spec.name} is not running on {node} after the reboot (found {info})", step="prove-running", node=node)
        return {"node": node, "reboot_type": RebootType(self.op.reboot_type).value}

    async def _ensure_running(self, ctx: Context, prefix: str) -> dict[str, Any]:
        """The instance ran before the job: make sure it runs after it."""
        record = await ctx.inventory.instance(self.op.instance)
        node, spec = record.primary, record.spec
        info = instance_info(await ctx.nodes.call(node, idempotent=True, step=f"{prefix}-check").get_instance_info(spec.name))
        restarted = False
        if not is_running(info):
            await ctx.nodes.call(node, step=f"{prefix}-start").start_instance(spec)
            restarted = True
        await ctx.journal.set_admin_state(spec.name, AdminState.UP, step=f"{prefix}-admin-up")
        return {"node": node, "restarted": restarted}

    async def compensate(self, ctx: Context, reason: str) -> None:
        if ctx.journal.last("reboot") is None and ctx.journal.last("stop") is None:
            return
        await self._ensure_running(ctx, "compensate")

    async def recover(self, ctx: Context) -> Outcome:
        acted = ctx.journal.last("reboot") or ctx.journal.last("start") or ctx.journal.last("stop")
        if acted is None and ctx.cancel_reason is None:
            try:
                return Outcome.succeeded(await self.run(ctx))
            except hv.HypervisorError as exc:
                return Outcome.failed(exc)
        state = await self._ensure_running(ctx, "recover")
        if ctx.cancel_reason is not None:
            return Outcome.cancelled(ctx.cancel_reason, state)
        finished = ctx.journal.last("start") if RebootType(self.op.reboot_type) is RebootType.HARD else ctx.journal.last("reboot")
        if finished is not None and finished.state.value == "succeeded":
            return Outcome.succeeded({**state, "reboot_type": RebootType(self.op.reboot_type).value})
        return Outcome.failed(
            StepFailed(
                f"the engine stopped during the reboot; {self.op.instance} is running on {state['node']}, but the reboot is not confirmed",
                step=acted.name if acted else None,
                node=state["node"],
            )
        )
