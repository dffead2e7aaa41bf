"""EvacuateNode: migrate every instance off a node, as child jobs.

Targets are chosen by free memory (the node with the most left, after what
was already placed there), ``concurrency`` children run at once (the
engine's per-node migration limit applies on top), and the parent reports
each instance's result. Cancelling the parent cancels the children.
"""

from __future__ import annotations

from typing import Any

import anyio

import hv
from transport.errors import TransportError

from .._ops_migration import EvacuateNode, Migrate
from .._workflow import Context, Outcome, Workflow
from ..errors import EngineError, StepFailed
from ._util import as_type


class EvacuationIncomplete(StepFailed):
    """Some instances could not be moved off the node (the message lists them)."""


class EvacuateWorkflow(Workflow[EvacuateNode]):
    OP = EvacuateNode
    COMPENSATION_TIMEOUT = 30.0

    async def _free_memory(self, ctx: Context) -> dict[str, int]:
        candidates = self.op.targets or [n for n in ctx.nodes.names if n != self.op.node]
        free: dict[str, int] = {}
        for node in candidates:
            if not ctx.nodes.online(node):
                continue
            try:
                info = as_type(await ctx.nodes.call(node, idempotent=True, step="target-memory", deadline=10.0).get_node_info(), hv.NodeInfo, what="get_node_info")
            except (hv.HypervisorError, TransportError, TimeoutError, StepFailed):
                continue
            free[node] = info.memory_free
        return free

    async def run(self, ctx: Context) -> Any:
        node = self.op.node
        inventory = await ctx.inventory.all()
        mine = sorted(name for name, r in inventory.items() if r.primary == node)
        raw = await ctx.nodes.call(node, idempotent=True, step="list-instances").get_all_instances_info()
        running = {i.name: i for i in (as_type(x, hv.InstanceInfo, what="get_all_instances_info") for x in raw)}
        free = await self._free_memory(ctx)
        results: dict[str, dict[str, Any]] = {}
        plan: list[tuple[str, str]] = []
        for name in sorted(mine, key=lambda n: (-(running[n].memory if n in running else 0), n)):
            info = running.get(name)
            if info is None or hv.HvInstanceState(info.state) not in (hv.HvInstanceState.RUNNING, hv.HvInstanceState.PAUSED):
                results[name] = {"state": "skipped", "reason": f"not running on {node}"}
                continue
            floor = inventory[name].spec.beparams.minmem if self.op.allow_runtime_changes else info.memory
            fits = [t for t, f in free.items() if f >= floor]
            if not fits:
                results[name] = {"state": "failed", "reason": f"no target has {floor} MiB free (free: {free})"}
                continue
            target = max(fits, key=lambda t: (free[t], t))
            free[target] -= min(info.memory, free[target])
            plan.append((name, target))
            results[name] = {"state": "planned", "target": target, "memory": info.memory}
        async with ctx.journal.step("plan", node=node) as s:
            s.result = {"plan": [{"instance": n, "target": t} for n, t in plan], "skipped": {n: r for n, r in results.items() if r["state"] != "planned"}}

        limiter = anyio.Semaphore(self.op.concurrency)

        async def move(name: str, target: str) -> None:
            async with limiter:
                op = Migrate(
                    instance=name, target=target, live=self.op.live,
                    allow_runtime_changes=self.op.allow_runtime_changes, policy=dict(self.op.policy),
                )
                try:
                    job_id = await ctx.jobs.submit_child(op)
                except EngineError as err:
                    results[name] = {"state": "failed", "target": target, "reason": f"{type(err).__name__}: {err}"}
                    return
                results[name] = {"state": "running", "target": target, "job": job_id}
                await ctx.journal.event("evacuate-child", instance=name, target=target, job=job_id)
                job = await ctx.jobs.wait(job_id)
                results[name] = {"state": job.state.value, "target": target, "job": job_id}
                if job.error is not None:
                    results[name]["reason"] = str(job.error)
                await ctx.journal.event("evacuate-result", instance=name, **results[name])

        async with anyio.create_task_group() as tg:
            for name, target in plan:
                tg.start_soon(move, name, target)
        async with ctx.journal.step("results", node=node) as s:
            s.result = results
        failed = {n: r for n, r in results.items() if r["state"] not in ("succeeded", "skipped")}
        if failed:
            lines = "; ".join(f"{n}: {r['state']} ({r.get('reason', '')})" for n, r in sorted(failed.items()))
            raise EvacuationIncomplete(f"evacuate {node}: {len(failed)} of {len(results)} instances not moved: {lines}", node=node)
        return {"node": node, "instances": results}

    async def recover(self, ctx: Context) -> Outcome:
        # The children are jobs of their own (recovered on their own); report what they did.
        children = await ctx.jobs.children()
        for child in children:
            if not child.final:
                await ctx.jobs.wait(child.id)
        children = [await ctx.jobs.get(j.id) for j in children]
        results = {getattr(j.op, "instance", str(j.id)): {"state": j.state.value, "job": j.id, "target": getattr(j.op, "target", None)} for j in children}
        if ctx.cancel_reason is not None:
            return Outcome.cancelled(ctx.cancel_reason, {"instances": results})
        return Outcome.failed(EvacuationIncomplete(f"evacuate {self.op.node}: interrupted by an engine restart; re-run it"), {"instances": results})
