"""Migrate: the seed's six steps, journaled, with a convergence policy around them.

::

    plan → pre-checks → migration_info (src) → accept_instance (dst)
         → migrate_instance (src) → monitor (long-polled get_migration_status,
           progress events, policy decisions) → point of no return
         → finalize_migration_dst (dst, +SetPrimary in the same transaction)
         → finalize_migration_source (src; unreachable → pending cleanup)

Abort (a failed step, a cancel, the policy's abort, a lost node, a monitor
that cannot read the status) before the point of no return: cancel the
migration on the source *first*, then ``finalize_migration_dst(False)`` and
``finalize_migration_source(False)``, then prove where the instance runs
(:func:`engine.workflows.reconcile.settle`). If the proof shows that the
migration completed after all, the job completes forward instead.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec

import hv
from transport.errors import TransportError

from .._inventory import AddPendingCleanup, AdminState, SetAdminState, SetPrimary
from .._ops_migration import Migrate, check_policy
from .._policy import Action, Convergence, Decision, MigrationPolicy
from .._workflow import Context, Outcome, Workflow
from ..errors import RecoveryPending, StepFailed
from ._util import as_type, instance_info
from .reconcile import Copy, Settlement, settle

#: Seconds the abort (cancel, finalize both sides, prove) may take.
ROLLBACK_TIMEOUT = 120.0


class MigrationFailed(StepFailed):
    """The migration did not happen; the message says why and where the instance runs."""


class PrecheckFailed(MigrationFailed):
    """A pre-check refused the migration before anything changed."""




class MigrateWorkflow(Workflow[Migrate]):
    OP = Migrate
    COMPENSATION_TIMEOUT = ROLLBACK_TIMEOUT

    def __init__(self, op: Migrate) -> None:
        super().__init__(op)
        self.rolled_back: Settlement | None = None
        self.info = ""

    # --- the forward path ---------------------------------------------------

    async def run(self, ctx: Context) -> Any:
        op = self.op
        record = await ctx.inventory.instance(op.instance)
        spec, src, dst = record.spec, record.primary, op.target
        policy = check_policy(op.kind, op.policy, ctx.policy.migration)
        started = ctx.clock.monotonic()
        async with ctx.journal.step("plan", args=f"{spec.name}: {src} -> {dst}") as s:
            s.result = {"source": src, "target": dst, "live": op.live, "policy": msgspec.to_builtins(policy)}
        hvp = hv.get_hypervisor_class(spec.hypervisor).fill_hvparams(spec.hvparams)
        if policy.auto_converge and "migration_caps" in hvp and "auto-converge" not in str(hvp["migration_caps"]):
            await ctx.journal.event(
                "warning",
                message=f"policy auto_converge is on, but {spec.name}'s migration_caps {hvp['migration_caps']!r} lack auto-converge: "
                "the hypervisor will not throttle the guest while the engine waits for the timeout",
            )
        await self._prechecks(ctx, spec, src, dst)
        try:
            self.info = str(await ctx.nodes.call(src).migration_info(spec))
            address = str(await ctx.nodes.call(dst).accept_instance(spec, self.info, ctx.nodes.address(dst)))
            await ctx.nodes.call(src).migrate_instance(spec, address, op.live)
            status, conv = await self._monitor(ctx, spec, src, dst, policy)
            # Inside the try: a cancel that lands here is handled like any other (the
            # rollback finds the copy complete and goes forward).
            await ctx.journal.point_of_no_return("migration completed: the target holds the whole instance")
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()) and ctx.cancel_reason is None and ctx.engine_closing():
                raise  # the engine is closing, not the job cancelled: the next engine recovers it
            with ctx.shielded(ROLLBACK_TIMEOUT):
                settlement = await self._rollback(ctx, spec, src, dst, exc)
                if settlement.winner == dst:
                    # It completed after all: the only safe direction is forward.
                    if ctx.journal.point_of_no_return_reached is None:
                        await ctx.journal.point_of_no_return(f"the migration completed while it was being aborted ({type(exc).__name__})")
                    await self._finalize_target_if_needed(ctx, spec, dst, settlement, self.info)
                    return await self._finish_source(ctx, spec, src, dst, started, None, None, settled=True)
            explained = self._explain(exc, spec, src, dst, settlement)
            if explained is exc:
                raise
            raise explained from exc
        return await self._complete(ctx, spec, src, dst, started, status, conv)

    def _explain(self, exc: BaseException, spec: hv.Instance, src: str, dst: str, settlement: Settlement) -> BaseException:
        if isinstance(exc, anyio.get_cancelled_exc_class()) or not isinstance(exc, Exception):
            return exc
        where = {
            "running": f"{spec.name} runs on {settlement.winner}",
            "down": f"{spec.name} runs nowhere and is marked down",
        }.get(settlement.outcome, f"{spec.name}: {settlement.message}")
        step = getattr(exc, "step", None)
        node = getattr(exc, "node", None)
        return MigrationFailed(
            f"migrate {spec.name} {src} -> {dst} failed{f' at step {step}' if step else ''}"
            f"{f' on node {node}' if node else ''}: {type(exc).__name__}: {exc}; rolled back: {where}",
            step=step, node=node, cause=type(exc).__name__,
        )

    async def _prechecks(self, ctx: Context, spec: hv.Instance, src: str, dst: str) -> None:
        name = spec.name
        what = f"migrate {name} {src} -> {dst}"

        async def read(node: str, step: str, ask: Callable[[hv.BaseHypervisor], Awaitable[Any]]) -> Any:
            # Retried (a read); a node that keeps refusing is marked offline by the
            # engine after a few attempts, and later jobs fail fast.
            try:
                return await ask(ctx.nodes.call(node, step=step, deadline=15.0, idempotent=True))
            except (TransportError, TimeoutError) as err:
                raise PrecheckFailed(f"{what}: node {node} cannot be reached ({type(err).__name__}: {err})", step=step, node=node) from err

        if not ctx.nodes.online(dst):
            raise PrecheckFailed(f"{what}: target node {dst} is offline", step="check-target-node", node=dst)
        info = instance_info(await read(src, "check-source", lambda node: node.get_instance_info(name)))
        if info is None or hv.HvInstanceState(info.state) not in (hv.HvInstanceState.RUNNING, hv.HvInstanceState.PAUSED):
            found = "absent" if info is None else hv.HvInstanceState(info.state).value
            raise PrecheckFailed(f"{what}: {name} is not running on its primary node {src} (found: {found})", step="check-source", node=src)
        there = instance_info(await read(dst, "check-target", lambda node: node.get_instance_info(name)))
        if there is not None:
            raise PrecheckFailed(
                f"{what}: {name} is already present on target node {dst} ({hv.HvInstanceState(there.state).value}); run Reconcile",
                step="check-target", node=dst,
            )
        src_node = as_type(await read(src, "check-source-node", lambda node: node.get_node_info()), hv.NodeInfo, what="get_node_info")
        dst_node = as_type(await read(dst, "check-target-node", lambda node: node.get_node_info()), hv.NodeInfo, what="get_node_info")
        cls = hv.get_hypervisor_class(spec.hypervisor)
        if not cls.versions_safe_for_migration(src_node.hv_version, dst_node.hv_version):
            message = (
                f"{what}: hypervisor versions {src_node.hv_version!r} on {src} and {dst_node.hv_version!r} on {dst} "
                f"are not safe for migration"
            )
            if not self.op.ignore_hv_versions:
                raise PrecheckFailed(message + " (ignore_hv_versions=True overrides)", step="check-versions", node=dst)
            await ctx.journal.event("warning", message=message + "; overridden by ignore_hv_versions")
        try:
            await ctx.nodes.call(dst, step="check-hvparams").validate_parameters(cls.fill_hvparams(spec.hvparams))
        except hv.HypervisorError as err:
            raise PrecheckFailed(f"{what}: hvparams are not valid on target node {dst}: {err.message}", step="check-hvparams", node=dst) from err
        need, free = info.memory, dst_node.memory_free
        if need > free:
            minmem = spec.beparams.minmem
            if not self.op.allow_runtime_changes:
                raise PrecheckFailed(
                    f"{what}: target node {dst} has {free} MiB free, {name} uses {need} MiB (allow_runtime_changes=True would balloon it)",
                    step="check-memory", node=dst,
                )
            if free < minmem:
                raise PrecheckFailed(
                    f"{what}: target node {dst} has {free} MiB free, less than {name}'s minmem of {minmem} MiB", step="check-memory", node=dst
                )
            await ctx.journal.event("policy", action="balloon", reason=f"target {dst} has {free} MiB free; ballooning {name} from {need} to {free} MiB")
            await ctx.nodes.call(src, step="balloon").balloon_instance_memory(spec, free)
            after = instance_info(await read(src, "check-balloon", lambda node: node.get_instance_info(name)))
            if after is None or after.memory > free:
                raise PrecheckFailed(
                    f"{what}: ballooning {name} to {free} MiB on {src} left it at {after.memory if after else '?'} MiB",
                    step="check-balloon", node=src,
                )

    async def _monitor(
        self, ctx: Context, spec: hv.Instance, src: str, dst: str, policy: MigrationPolicy
    ) -> tuple[hv.MigrationStatus, Convergence]:
        """Long-poll the status until final; progress events; policy decisions."""
        downtime = int(policy.downtime_start_ms or hv.get_hypervisor_class(spec.hypervisor).fill_hvparams(spec.hvparams).get("migration_downtime", 300))
        if policy.downtime_start_ms is not None:
            await self._decide(ctx, spec, src, Decision(Action.RAISE_DOWNTIME, "the policy's starting downtime", downtime), None)
        conv = Convergence(policy, ram_total=spec.beparams.maxmem * 2**20, started=ctx.clock.monotonic(), downtime_ms=downtime)
        failures = 0
        percent = 0.0
        last_emit = -math.inf
        last_status = ""
        async with ctx.journal.step("monitor", node=src, args=f"get_migration_status({spec.name}, wait={policy.status_wait:g})") as step:
            while True:
                if not ctx.nodes.online(dst):
                    raise MigrationFailed(f"target node {dst} went offline during the migration", step="monitor", node=dst)
                if not ctx.nodes.online(src):
                    raise MigrationFailed(f"source node {src} went offline during the migration", step="monitor", node=src)
                try:
                    raw = await ctx.nodes.read(src, deadline=policy.status_wait + policy.status_timeout, step="monitor").get_migration_status(spec, wait=policy.status_wait)
                    status = as_type(raw, hv.MigrationStatus, what="get_migration_status")
                except (hv.HypervisorError, TransportError, TimeoutError) as err:
                    failures += 1
                    await ctx.journal.event("status-read-failed", node=src, failures=failures, tolerated=policy.status_failures, error=f"{type(err).__name__}: {err}")
                    if failures > policy.status_failures:
                        raise MigrationFailed(
                            f"the migration's status could not be read {failures} times in a row on {src} (last: {type(err).__name__}: {err})",
                            step="monitor", node=src,
                        ) from err
                    await ctx.clock.sleep(min(1.0, 0.05 * 2**failures))
                    continue
                failures = 0
                now = ctx.clock.monotonic()
                if status.failed:
                    raise MigrationFailed(
                        f"the migration {status.status} on {src}" + (f": {status.error}" if status.error else ""), step="monitor", node=src
                    )
                percent = max(percent, round(status.progress * 100, 1))
                if status.succeeded or status.status != last_status or now - last_emit >= policy.progress_interval:
                    last_emit, last_status = now, status.status
                    ctx.journal.progress(**self._progress(status, percent, now - conv.started, conv.downtime_ms), step="monitor", node=src)
                if status.succeeded:
                    step.result = {
                        "status": status.status, "ram_total": status.ram_total, "ram_transferred": status.ram_transferred,
                        "downtime_ms": status.downtime_ms, "total_time_ms": status.total_time_ms, "iterations": status.iterations,
                        "decisions": [d.as_event() for d in conv.decisions],
                    }
                    return status, conv
                decision = conv.observe(now, status.ram_remaining, status.ram_total or None)
                if decision is not None:
                    await self._decide(ctx, spec, src, decision, conv)

    @staticmethod
    def _progress(status: hv.MigrationStatus, percent: float, elapsed: float, downtime_ms: int) -> dict[str, Any]:
        rate, dirty = status.rate_bps, status.dirty_rate_bps
        eta = None
        if rate and rate > (dirty or 0.0):
            eta = round(status.ram_remaining / (rate - (dirty or 0.0)), 1)
        if status.succeeded:
            eta = 0.0
        return {
            "status": status.status,
            "percent": percent,
            "ram_transferred": status.ram_transferred,
            "ram_remaining": status.ram_remaining,
            "ram_total": status.ram_total,
            "rate_bps": rate,
            "dirty_rate_bps": dirty,
            "eta_s": eta,
            "iterations": status.iterations,
            "downtime_limit_ms": downtime_ms,
            "elapsed_s": round(elapsed, 2),
        }

    async def _decide(self, ctx: Context, spec: hv.Instance, src: str, decision: Decision, conv: Convergence | None) -> None:
        """Apply one policy decision; each is an event with its reason."""
        await ctx.journal.event("policy", **decision.as_event())
        ctx.log.info("migration policy", **decision.as_event())
        if decision.action is Action.RAISE_DOWNTIME:
            try:
                await ctx.nodes.call(src, step="set-downtime").set_migration_downtime(spec, int(decision.downtime_ms or 0))
            except hv.MigrationError as err:
                await ctx.journal.event("policy", action="downtime-unsupported", reason=f"cannot change the downtime on {src}: {err.message}")
                if conv is not None:
                    conv.downtime_unsupported()
        elif decision.action is Action.FORCE_COMPLETE:
            await ctx.nodes.call(src, step="force-complete").force_complete_migration(spec)
        elif decision.action is Action.ABORT:
            raise MigrationFailed(f"the convergence policy aborted the migration: {decision.reason}", step="monitor", node=src)

    async def _complete(
        self, ctx: Context, spec: hv.Instance, src: str, dst: str, started: float, status: hv.MigrationStatus, conv: Convergence
    ) -> dict[str, Any]:
        """After the point of no return: the target runs it, the inventory says so, the source goes."""
        try:
            await ctx.nodes.call(dst, inventory=[SetPrimary(instance=spec.name, node=dst), SetAdminState(instance=spec.name, state=AdminState.UP)]).finalize_migration_dst(spec, self.info, True)
        except (hv.HypervisorError, TransportError, TimeoutError, StepFailed) as err:
            # The target did not confirm: find out from the nodes where the instance is.
            settlement = await settle(ctx, spec, [src, dst], owner=src, prefix="complete")
            if settlement.winner != dst:
                raise MigrationFailed(
                    f"migrate {spec.name}: the copy completed but finalizing the target {dst} failed ({type(err).__name__}: {err}); "
                    f"{settlement.message}",
                    step="finalize_migration_dst", node=dst,
                ) from err
            await self._finalize_target_if_needed(ctx, spec, dst, settlement, self.info)
            return await self._finish_source(ctx, spec, src, dst, started, status, conv, settled=True)
        return await self._finish_source(ctx, spec, src, dst, started, status, conv)

    async def _finalize_target_if_needed(self, ctx: Context, spec: hv.Instance, dst: str, settlement: Settlement, info: str) -> None:
        """A target found running by a reconcile (QEMU resumes it by itself) still gets its finalize.

        The driver's ``finalize_migration_dst(True)`` is where it tidies the
        received instance (QEMU: NICs, the incoming port); skipped when this
        job or the reconcile already did it.
        """
        journaled = any(s.name == "finalize_migration_dst" and s.state.value == "succeeded" for s in ctx.journal.steps)
        if journaled or any(a.startswith("finalize-target on") for a in settlement.actions):
            return
        try:
            await ctx.nodes.call(dst, step="finalize-target-after-reconcile", deadline=60.0).finalize_migration_dst(spec, info, True)
        except (hv.HypervisorError, TransportError, TimeoutError, StepFailed) as err:
            await ctx.journal.event(
                "warning",
                message=f"finalize_migration_dst on {dst} after reconciling: {type(err).__name__}: {err} (harmless when it was already finalized)",
            )

    async def _finish_source(
        self, ctx: Context, spec: hv.Instance, src: str, dst: str, started: float,
        status: hv.MigrationStatus | None, conv: Convergence | None, *, settled: bool = False,
    ) -> dict[str, Any]:
        pending = None
        if not settled:
            try:
                await ctx.nodes.call(src).finalize_migration_source(spec, True, self.op.live)
            except (hv.HypervisorError, TransportError, TimeoutError, StepFailed) as err:
                pending = f"finalize_migration_source on {src} failed after the migration completed: {type(err).__name__}: {err}"
                await ctx.journal.commit("pending-cleanup", [AddPendingCleanup(instance=spec.name, node=src, reason=pending)], node=src, reason=pending)
        info = instance_info(await ctx.nodes.call(dst, idempotent=True, step="prove-target").get_instance_info(spec.name))
        if info is None or hv.HvInstanceState(info.state) is not hv.HvInstanceState.RUNNING:
            await ctx.journal.event("alarm", alarm="not-running-after-migration", instance=spec.name, node=dst, found=None if info is None else info.state)
        result: dict[str, Any] = {
            "instance": spec.name,
            "source": src,
            "target": dst,
            "node": dst,
            "live": self.op.live,
            "wall_time_s": round(ctx.clock.monotonic() - started, 3),
            "pending_cleanup": pending,
        }
        if status is not None:
            result.update(
                ram_total=status.ram_total, ram_transferred=status.ram_transferred, downtime_ms=status.downtime_ms,
                total_time_ms=status.total_time_ms, iterations=status.iterations,
            )
        if conv is not None:
            result["decisions"] = [d.as_event() for d in conv.decisions]
        return result

    # --- abort ----------------------------------------------------------------

    async def _rollback(self, ctx: Context, spec: hv.Instance, src: str, dst: str, exc: BaseException | None) -> Settlement:
        """Cancel on the source, finalize both sides with success=False, prove where it runs."""
        mode, ctx.mode = ctx.mode, "compensate"  # try the nodes for real, even ones marked offline
        try:
            return await self._rollback_steps(ctx, spec, src, dst, exc)
        finally:
            ctx.mode = mode

    async def _rollback_steps(self, ctx: Context, spec: hv.Instance, src: str, dst: str, exc: BaseException | None) -> Settlement:
        cancelled = exc is not None and isinstance(exc, anyio.get_cancelled_exc_class())
        reason = ctx.cancel_reason if cancelled else f"{type(exc).__name__}: {exc}" if exc is not None else "recovery"
        await ctx.journal.event("abort", reason=reason)
        accepted = ctx.journal.last("accept_instance") is not None
        migrating = ctx.journal.last("migrate_instance") is not None
        completed = False
        if migrating:
            # Abort the driver's migration before anything else (Nova LP #1905944).
            try:
                await ctx.nodes.call(src, step="rollback-cancel", deadline=60.0).cancel_migration(spec)
            except (hv.HypervisorError, TransportError, TimeoutError, StepFailed) as err:
                await ctx.journal.event("rollback-error", step="rollback-cancel", node=src, error=f"{type(err).__name__}: {err}")
            try:
                raw = await ctx.nodes.call(src, idempotent=True, step="rollback-status", deadline=10.0).get_migration_status(spec)
                completed = as_type(raw, hv.MigrationStatus, what="get_migration_status").succeeded
            except (hv.HypervisorError, TransportError, TimeoutError, StepFailed):
                completed = False
        if not completed:
            if accepted:
                try:
                    await ctx.nodes.call(dst, step="rollback-finalize-dst", deadline=60.0).finalize_migration_dst(spec, self.info, False)
                except (hv.HypervisorError, TransportError, TimeoutError, StepFailed) as err:
                    await ctx.journal.event("rollback-error", step="rollback-finalize-dst", node=dst, error=f"{type(err).__name__}: {err}")
            if migrating:
                try:
                    await ctx.nodes.call(src, step="rollback-finalize-source", deadline=60.0).finalize_migration_source(spec, False, self.op.live)
                except (hv.HypervisorError, TransportError, TimeoutError, StepFailed) as err:
                    await ctx.journal.event("rollback-error", step="rollback-finalize-source", node=src, error=f"{type(err).__name__}: {err}")
        settlement = await settle(ctx, spec, [src, dst], owner=src, prefix="rollback")
        self.rolled_back = settlement
        return settlement

    async def compensate(self, ctx: Context, reason: str) -> None:
        # run() rolls back itself; this covers a run that never got there.
        if self.rolled_back is not None or ctx.journal.last("plan") is None:
            return
        plan = ctx.journal.last("plan")
        assert plan is not None
        if ctx.journal.last("migration_info") is None:
            return  # only pre-checks ran (a balloon stays: the guest runs, smaller)
        record = await ctx.inventory.instance(self.op.instance)
        await self._rollback(ctx, record.spec, plan.result["source"], plan.result["target"], None)

    # --- after an engine crash --------------------------------------------------

    async def recover(self, ctx: Context) -> Outcome:
        plan = ctx.journal.last("plan")
        record = await ctx.inventory.instance(self.op.instance)
        if plan is None or not isinstance(plan.result, dict) or ctx.journal.last("migration_info") is None:
            if ctx.cancel_reason is not None:
                return Outcome.cancelled(ctx.cancel_reason, {"node": record.primary})
            return Outcome.failed(
                MigrationFailed(f"migrate {self.op.instance}: the engine stopped before the migration began; nothing changed"),
                {"node": record.primary},
            )
        src, dst = str(plan.result["source"]), str(plan.result["target"])
        settlement = await settle(ctx, record.spec, [src, dst], owner=record.primary, prefix="recover")
        result = {"source": src, "target": dst, **settlement.as_result()}
        if settlement.outcome == "pending":
            raise RecoveryPending(f"migrate {self.op.instance}: {settlement.message}")
        if settlement.winner == dst:
            info_step = ctx.journal.last("migration_info")
            info = str(info_step.result) if info_step is not None and isinstance(info_step.result, str) else ""
            await self._finalize_target_if_needed(ctx, record.spec, dst, settlement, info)
            if ctx.journal.last("finalize_migration_source") is None or ctx.journal.last("finalize_migration_source").state.value != "succeeded":
                leftover = settlement.views.get(src)
                if leftover is not None and leftover.copy is Copy.UNKNOWN:
                    result["pending_cleanup"] = f"{src} could not be asked"
            return Outcome.succeeded(result)
        if ctx.cancel_reason is not None and settlement.outcome == "running":
            return Outcome.cancelled(ctx.cancel_reason, result)
        return Outcome.failed(
            MigrationFailed(f"migrate {self.op.instance}: the engine stopped mid-migration; {settlement.message}", step="recover"),
            result,
        )


__all__ = ["MigrateWorkflow", "MigrationFailed", "PrecheckFailed"]
