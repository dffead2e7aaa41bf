"""Reconcile, VerifyCluster, Failover, EvacuateNode and job dependencies on fake nodes."""

from __future__ import annotations

import anyio
import pytest

import hv
from engine import (
    AdminState,
    EvacuateNode,
    Failover,
    InvalidOperation,
    JobState,
    Migrate,
    Reconcile,
    VerifyCluster,
)
from transport.errors import NodeUnreachable

from .conftest import MIB, Env, spec, step_names

pytestmark = pytest.mark.anyio


def node_down(env: Env, node: str) -> None:
    """Every call to ``node`` fails as unreachable (engine side), like a dead host."""
    for method in (*hv.REMOTE_METHODS, "ping"):
        env.transport.faults.inject(node, method, error=NodeUnreachable(f"node {node} is powered off", node=node))


def node_up(env: Env, node: str) -> None:
    env.transport.faults.clear(node)


async def test_verify_finds_a_planted_split_brain_and_reconcile_stops_the_stray_copy(make_env) -> None:
    async with make_env(nodes=("n1", "n2", "n3"), instances={"web1": ("n1", spec()), "db1": ("n2", spec("db1"))}) as env:
        await env.start(spec("web1"), "n3")  # planted: web1 also runs on n3
        await env.start(spec("ghost"), "n2")  # and an instance nobody knows
        job = await env.engine.wait(await env.engine.submit(VerifyCluster()))
        assert job.state is JobState.SUCCEEDED
        assert job.result["ok"] is False
        kinds = {(p["kind"], p["instance"]) for p in job.result["problems"]}
        assert kinds == {("runs-on-several", "web1"), ("unknown-instance", "ghost")}
        several = next(p for p in job.result["problems"] if p["kind"] == "runs-on-several")
        assert several["nodes"] == ["n1", "n3"]
        # Reconcile: the inventory's copy (n1) is proven running, so the stray one goes
        job = await env.engine.wait(await env.engine.submit(Reconcile(instance="web1")))
        assert job.state is JobState.SUCCEEDED, job.error
        assert any("stop-duplicate on n3" in a for a in job.result["actions"])
        await env.assert_runs_once("web1", "n1")
        job = await env.engine.wait(await env.engine.submit(VerifyCluster()))
        assert {p["kind"] for p in job.result["problems"]} == {"unknown-instance"}


async def test_split_brain_without_a_proven_owner_fences_nothing(make_env) -> None:
    async with make_env(nodes=("n1", "n2", "n3"), instances={"web1": ("n1", spec())}) as env:
        await env.transport.node("n1").stop_instance(spec("web1"), force=True)
        await env.start(spec("web1"), "n2")
        await env.start(spec("web1"), "n3")
        job_id = await env.engine.submit(Reconcile(instance="web1"))
        job = await env.engine.wait(job_id)
        assert job.state is JobState.FAILED and "fencing nothing" in job.error.message
        (alarm,) = await env.events(job_id, "alarm")
        assert alarm.data["alarm"] == "split-brain" and set(alarm.data["evidence"]) >= {"n2", "n3"}
        assert await env.where("web1") == {"n2": "running", "n3": "running"}


async def test_reconcile_moves_the_inventory_or_marks_it_down_with_evidence(make_env) -> None:
    async with make_env(instances={"web1": ("n1", spec())}) as env:
        # really runs on n2 only
        await env.transport.node("n1").stop_instance(spec("web1"), force=True)
        await env.start(spec("web1"), "n2")
        job = await env.engine.wait(await env.engine.submit(VerifyCluster()))
        assert [p["kind"] for p in job.result["problems"]] == ["wrong-node"]
        job = await env.engine.wait(await env.engine.submit(Reconcile(instance="web1")))
        assert job.state is JobState.SUCCEEDED and job.result["node"] == "n2"
        await env.assert_runs_once("web1", "n2")
        # runs nowhere
        await env.transport.node("n2").stop_instance(spec("web1"), force=True)
        job_id = await env.engine.submit(Reconcile(instance="web1"))
        job = await env.engine.wait(job_id)
        assert job.state is JobState.SUCCEEDED and job.result["outcome"] == "down"
        assert job.result["evidence"] == {"n2": {"copy": "absent"}, "n1": {"copy": "absent"}}
        assert (await env.engine.instance("web1")).admin_state is AdminState.DOWN
        assert await env.events(job_id, "instance-down")


async def test_reconcile_never_guesses_about_a_node_it_cannot_ask(make_env) -> None:
    async with make_env(nodes=("n1", "n2", "n3"), instances={"web1": ("n1", spec())}) as env:
        node_down(env, "n1")
        node_down(env, "n3")  # not relevant to web1: left out, no pending cleanup there
        job = await env.engine.wait(await env.engine.submit(Reconcile(instance="web1")))
        assert job.state is JobState.FAILED and "cannot be asked" in job.error.message
        record = await env.engine.instance("web1")
        assert record.primary == "n1" and record.admin_state is AdminState.UP  # nothing decided blindly
        assert [p.node for p in record.pending_cleanup] == ["n1"]
        node_up(env, "n1")  # back: the janitor's Reconcile proves it runs there
        with anyio.fail_after(20):
            while (await env.engine.instance("web1")).pending_cleanup:
                await anyio.sleep(0.05)
        node_up(env, "n3")
        await env.assert_runs_once("web1", "n1")


async def test_reconcile_finishes_an_orphaned_completed_migration(make_env) -> None:
    async with make_env(instances={"web1": ("n1", spec())}) as env:
        n1, n2 = env.transport.node("n1"), env.transport.node("n2")
        info = await n1.migration_info(spec())
        address = await n2.accept_instance(spec(), info, "")
        await n1.migrate_instance(spec(), address, True)
        with anyio.fail_after(10):
            while not (await n1.get_migration_status(spec(), wait=1.0)).is_final:
                pass
        # nobody finalized: source paused (postmigrate), target paused with everything
        assert await env.where("web1") == {"n1": "paused", "n2": "paused"}
        job = await env.engine.wait(await env.engine.submit(Reconcile(instance="web1")))
        assert job.state is JobState.SUCCEEDED, job.error
        await env.assert_runs_once("web1", "n2")


async def test_failover_only_when_the_primary_is_down_and_confirmed(make_env) -> None:
    async with make_env(instances={"web1": ("n1", spec())}) as env:
        with pytest.raises(InvalidOperation, match="primary_down=True"):
            await env.engine.submit(Failover(instance="web1", target="n2"))
        job = await env.engine.wait(await env.engine.submit(Failover(instance="web1", target="n2", primary_down=True)))
        assert job.state is JobState.FAILED and "primary node n1 answers" in job.error.message
        await env.assert_runs_once("web1", "n1")

        node_down(env, "n1")
        job = await env.engine.wait(await env.engine.submit(Failover(instance="web1", target="n2", primary_down=True)))
        assert job.state is JobState.SUCCEEDED, job.error
        record = await env.engine.instance("web1")
        assert record.primary == "n2" and [p.node for p in record.pending_cleanup] == ["n1"]
        # n1 comes back with its stale copy still running: the janitor's Reconcile stops it
        node_up(env, "n1")
        with anyio.fail_after(20):
            while (await env.engine.instance("web1")).pending_cleanup:
                await anyio.sleep(0.05)
        await env.assert_runs_once("web1", "n2")


async def test_evacuate_node_by_free_memory_as_child_jobs(make_env) -> None:
    instances = {f"vm{i}": ("n1", spec(f"vm{i}", mem=128 * (i + 1))) for i in range(3)}
    async with make_env(
        nodes=("n1", "n2", "n3"), instances=instances, memory={"n1": 4096, "n2": 400, "n3": 1000}, max_migrations_per_node=2
    ) as env:
        job_id = await env.engine.submit(EvacuateNode(node="n1", concurrency=2))
        job = await env.engine.wait(job_id)
        assert job.state is JobState.SUCCEEDED, job.error
        results = job.result["instances"]
        assert {n: r["state"] for n, r in results.items()} == {"vm0": "succeeded", "vm1": "succeeded", "vm2": "succeeded"}
        # biggest first to the node with most free memory: vm2 (384) -> n3 (1000), vm1 (256) -> n3 (616), vm0 (128) -> n2 (400)
        assert {n: r["target"] for n, r in results.items()} == {"vm2": "n3", "vm1": "n3", "vm0": "n2"}
        children = [j for j in await env.engine.list() if j.parent_id == job_id]
        assert len(children) == 3 and all(c.kind == "migrate" for c in children)
        for name, r in results.items():
            await env.assert_runs_once(name, r["target"])


async def test_cancelling_an_evacuation_cancels_its_children(make_env) -> None:
    instances = {f"vm{i}": ("n1", spec(f"vm{i}")) for i in range(2)}
    async with make_env(nodes=("n1", "n2"), instances=instances, settings={"bandwidth": 16 * MIB}) as env:
        job_id = await env.engine.submit(EvacuateNode(node="n1", concurrency=1))
        async for event in env.engine.watch(job_id):
            if event.kind == "evacuate-child":
                break
        child = event.data["job"]
        assert await env.engine.cancel(job_id, "maintenance called off") is JobState.CANCELLED
        assert (await env.engine.wait(child)).state is JobState.CANCELLED
        for name in instances:
            await env.assert_runs_once(name, "n1")


async def test_job_dependencies_chain_migrations(make_env) -> None:
    async with make_env(nodes=("n1", "n2", "n3"), instances={"web1": ("n1", spec())}) as env:
        first = await env.engine.submit(Migrate(instance="web1", target="n2"))
        second = await env.engine.submit(Migrate(instance="web1", target="n3"), depends_on=[first])
        assert (await env.engine.wait(first)).state is JobState.SUCCEEDED
        job = await env.engine.wait(second)
        assert job.state is JobState.SUCCEEDED, job.error
        assert job.result["source"] == "n2"
        await env.assert_runs_once("web1", "n3")
        # a dependency that fails fails the dependent job, which never touches a node
        env.fault("n3", "migration_info", error="nope", times=1)
        bad = await env.engine.submit(Migrate(instance="web1", target="n1"))
        env.fault("n3", "migration_info", error="nope", times=1)
        after = await env.engine.submit(Migrate(instance="web1", target="n2"), depends_on=[bad])
        assert (await env.engine.wait(bad)).state is JobState.FAILED
        job = await env.engine.wait(after)
        assert job.state is JobState.FAILED and "depends on" in job.error.message and job.steps == []


async def test_evacuation_interrupted_by_an_engine_restart_settles_every_child(make_env) -> None:
    instances = {f"vm{i}": ("n1", spec(f"vm{i}")) for i in range(2)}
    async with make_env(nodes=("n1", "n2"), instances=instances, settings={"bandwidth": 16 * MIB}) as env:
        job_id = await env.engine.submit(EvacuateNode(node="n1", concurrency=1))
        async for event in env.engine.watch(job_id):
            if event.kind == "evacuate-child":
                break
        async for event in env.engine.watch(event.data["job"]):
            if event.kind == "progress" and event.data.get("percent", 0) > 5:
                break  # the first child is mid-copy: close the engine now (jobs stay running in the store)
    async with make_env(nodes=("n1", "n2")) as env:
        with anyio.fail_after(30):
            parent = await env.engine.wait(job_id)
        assert parent.state is JobState.FAILED and "re-run it" in parent.error.message
        assert parent.result["recovered"] is True
        children = [j for j in await env.engine.list() if j.parent_id == job_id]
        assert children and all(j.state.final for j in children)
        for name in instances:
            record = await env.engine.instance(name)
            await env.assert_runs_once(name, record.primary)


async def test_failover_interrupted_by_an_engine_restart(make_env) -> None:
    async with make_env(instances={"web1": ("n1", spec())}) as env:
        node_down(env, "n1")
        env.fault("n2", "start_instance", delay=0.5, times=1)
        job_id = await env.engine.submit(Failover(instance="web1", target="n2", primary_down=True))
        async for event in env.engine.watch(job_id):
            if event.kind == "step-start" and event.data.get("step") == "start":
                break  # close the engine with the start in flight (the call is cancelled on the node)
    async with make_env() as env:
        job = await env.engine.wait(job_id)
        assert job.state is JobState.FAILED and "not running on n2" in job.error.message
        assert job.result["recovered"] is True
        record = await env.engine.instance("web1")
        assert record.primary == "n1" and await env.where("web1") == {"n1": "running"}
