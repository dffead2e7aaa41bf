"""VerifyCluster: compare the inventory with what every node really runs.

Read-only (no locks, no changes). Problems reported, each also an event:

* ``runs-nowhere``: admin state up, present on no reachable node;
* ``runs-on-several``: running or paused on two or more nodes (split brain);
* ``wrong-node``: present on exactly one node, not the inventory's primary;
* ``running-while-down``: admin state down, but running on a node;
* ``unknown-instance``: a node runs an instance the inventory does not know;
* ``incoming``: a migration target copy (a migration in progress, or a leftover);
* ``pending-cleanup``: a migration or failover left work for a node that was unreachable;
* ``primary-unreachable``: the primary could not be asked.
"""

from __future__ import annotations

from typing import Any

import hv
from transport.errors import TransportError

from .._inventory import AdminState
from .._ops_migration import VerifyCluster
from .._workflow import Context, Outcome, Workflow
from ..errors import StepFailed
from ._util import as_type

_PRESENT = (hv.HvInstanceState.RUNNING, hv.HvInstanceState.PAUSED)


class VerifyWorkflow(Workflow[VerifyCluster]):
    OP = VerifyCluster
    async def run(self, ctx: Context) -> Any:
        inventory = await ctx.inventory.all()
        nodes: dict[str, str] = {}
        seen: dict[str, dict[str, str]] = {}  # instance -> node -> state
        for node in ctx.nodes.names:
            if not ctx.nodes.online(node):
                nodes[node] = "offline"
                continue
            try:
                raw = await ctx.nodes.call(node, idempotent=True, step="list", deadline=10.0).get_all_instances_info()
            except (hv.HypervisorError, TransportError, TimeoutError, StepFailed) as err:
                nodes[node] = f"unreachable: {type(err).__name__}: {err}"
                continue
            nodes[node] = "ok"
            for item in raw:
                info = as_type(item, hv.InstanceInfo, what="get_all_instances_info")
                seen.setdefault(info.name, {})[node] = hv.HvInstanceState(info.state).value
        problems: list[dict[str, Any]] = []

        def problem(kind: str, instance: str, message: str, **extra: Any) -> None:
            problems.append({"kind": kind, "instance": instance, "message": message, **extra})

        for name, record in sorted(inventory.items()):
            where = seen.get(name, {})
            present = sorted(n for n, s in where.items() if hv.HvInstanceState(s) in _PRESENT)
            incoming = sorted(n for n, s in where.items() if hv.HvInstanceState(s) is hv.HvInstanceState.INCOMING)
            primary_known = nodes.get(record.primary) == "ok"
            if not primary_known:
                problem("primary-unreachable", name, f"{name}: primary node {record.primary} could not be asked ({nodes.get(record.primary)})", primary=record.primary)
            if len(present) >= 2:
                problem("runs-on-several", name, f"{name} runs on {len(present)} nodes: {', '.join(f'{n} ({where[n]})' for n in present)}", nodes=present, primary=record.primary)
            elif len(present) == 1 and present[0] != record.primary:
                problem("wrong-node", name, f"{name} runs on {present[0]}, the inventory says {record.primary}", nodes=present, primary=record.primary)
            elif not present and record.admin_state is AdminState.UP and primary_known:
                problem("runs-nowhere", name, f"{name} should be up but runs on no node", nodes=[], primary=record.primary)
            if present and record.admin_state is AdminState.DOWN:
                problem("running-while-down", name, f"{name} is marked down but runs on {', '.join(present)}", nodes=present)
            if incoming:
                problem("incoming", name, f"{name} has an incoming migration copy on {', '.join(incoming)}", nodes=incoming)
            for p in record.pending_cleanup:
                problem("pending-cleanup", name, f"{name}: pending cleanup on {p.node}: {p.reason}", nodes=[p.node], job_id=p.job_id)
        for name in sorted(set(seen) - set(inventory)):
            problem("unknown-instance", name, f"{name} runs on {', '.join(sorted(seen[name]))} but is not in the inventory", nodes=sorted(seen[name]))
        for p in problems:
            await ctx.journal.event("verify-problem", problem=p["kind"], **{k: v for k, v in p.items() if k != "kind"})
        return {"ok": not problems, "nodes": nodes, "instances": len(inventory), "problems": problems}

    async def recover(self, ctx: Context) -> Outcome:
        return Outcome.succeeded(await self.run(ctx))
