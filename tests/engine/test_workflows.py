"""Start/stop/reboot against fake nodes over the SSH transport and the local one."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from engine import (
    AdminState,
    Engine,
    InvalidOperation,
    JobState,
    RebootInstance,
    StartInstance,
    StopInstance,
)

from .conftest import FakeCluster

pytestmark = pytest.mark.anyio


async def _node_event(cluster: FakeCluster, node: str, event: str, method: str, *, count: int = 1) -> None:
    """Poll the node's own journal (another process, over SSH) until it shows the event."""
    with anyio.fail_after(10):
        while sum(1 for e in cluster.events(node) if e["event"] == event and e.get("method") == method) < count:
            await anyio.sleep(0.02)


async def _wait_step(engine: Engine, job_id: int, step: str) -> None:
    async for ev in engine.watch(job_id):
        if ev.kind == "step-start" and ev.data["step"] == step:
            return
    raise AssertionError(f"job {job_id} ended before step {step!r} started")


async def test_start_stop_reboot(fake_cluster: FakeCluster, store_path: Path) -> None:
    async with fake_cluster.engine(store_path) as engine:
        job = await engine.wait(await engine.submit(StartInstance(instance="web1")))
        assert job.state is JobState.SUCCEEDED, job.error
        assert job.result["node"] == "n1" and job.result["state"] == "running"
        assert 128 <= job.result["memory"] <= 512
        assert [s.name for s in job.steps] == ["check-state", "startup-memory", "node-memory", "start", "prove-running"]
        assert all(s.node == "n1" for s in job.steps)
        assert "web1" in fake_cluster.running("n1")
        assert (await engine.instance("web1")).admin_state is AdminState.UP

        # starting a running instance is a no-op that says so
        again = await engine.wait(await engine.submit(StartInstance(instance="web1")))
        assert again.state is JobState.SUCCEEDED and again.result["already_running"] is True

        soft = await engine.wait(await engine.submit(RebootInstance(instance="web1")))
        assert soft.state is JobState.SUCCEEDED, soft.error
        hard = await engine.wait(await engine.submit(RebootInstance(instance="web1", reboot_type="hard")))
        assert hard.state is JobState.SUCCEEDED, hard.error
        assert [s.name for s in hard.steps][-3:] == ["stop", "start", "prove-running"]
        methods = [e["method"] for e in fake_cluster.events("n1") if e["event"] == "end"]
        assert "reboot_instance" in methods

        stop = await engine.wait(await engine.submit(StopInstance(instance="web1", timeout=10)))
        assert stop.state is JobState.SUCCEEDED, stop.error
        assert stop.result["how"] == "soft" and stop.result["stage"] == "soft"
        assert "web1" not in fake_cluster.running("n1")
        assert (await engine.instance("web1")).admin_state is AdminState.DOWN

        gone = await engine.wait(await engine.submit(StopInstance(instance="web1")))
        assert gone.state is JobState.SUCCEEDED and gone.result["how"] == "already-stopped"


async def test_stop_escalates_to_hard(local_cluster: FakeCluster, store_path: Path) -> None:
    local_cluster.configure("n1", soft_stop_delay=None)  # the guest ignores ACPI
    async with local_cluster.engine(store_path) as engine:
        assert (await engine.wait(await engine.submit(StartInstance(instance="web1")))).state is JobState.SUCCEEDED
        job = await engine.wait(await engine.submit(StopInstance(instance="web1", timeout=0.2)))
        assert job.state is JobState.SUCCEEDED, job.error
        assert job.result["how"] == "hard" and job.result["stage"] == "monitor"
        assert [s["stage"] for s in job.result["stages"]] == ["soft", "monitor"]
        # the driver's progress (stage reports) came through as job events
        progress = [e.data for e in await engine.store.events(job.id) if e.kind == "progress"]
        assert any(p.get("stage") == "soft" and p.get("node") == "n1" for p in progress)


async def test_invalid_operations_rejected(local_cluster: FakeCluster, store_path: Path) -> None:
    async with local_cluster.engine(store_path) as engine:
        with pytest.raises(InvalidOperation, match="migration_downtime"):
            await engine.submit(StartInstance(instance="web1", hvparams={"migration_downtime": "soon"}))
        with pytest.raises(InvalidOperation, match="no_such_param.*not supported"):
            await engine.submit(StartInstance(instance="web1", hvparams={"no_such_param": 1}))
        with pytest.raises(InvalidOperation, match="timeout"):
            await engine.submit(StopInstance(instance="web1", timeout=-1))
        with pytest.raises(InvalidOperation, match="unknown instance"):
            await engine.submit(RebootInstance(instance="db9"))
        assert await engine.list() == []


START_STEPS = [
    ("check-state", "get_instance_info"),
    ("node-memory", "get_node_info"),
    ("start", "start_instance"),
]


@pytest.mark.parametrize(("step", "method"), START_STEPS)
async def test_cancel_start_in_each_step(fake_cluster: FakeCluster, store_path: Path, step: str, method: str) -> None:
    fake_cluster.configure("n1", faults={method: {"hang": True, "times": 1}})
    async with fake_cluster.engine(store_path) as engine:
        job_id = await engine.submit(StartInstance(instance="web1"))
        await _wait_step(engine, job_id, step)
        # the call is hanging on the node (started there), then we cancel
        await _node_event(fake_cluster, "n1", "start", method, count=2 if method == "get_instance_info" and step != "check-state" else 1)
        assert await engine.cancel(job_id, reason="operator changed plans") is JobState.CANCELLED
        job = await engine.get(job_id)
        assert job.cancel_reason == "operator changed plans"
        cancelled_step = next(s for s in job.steps if s.name == step)
        assert cancelled_step.state.value == "cancelled"
        # the call was cancelled on the node, not just abandoned
        await _node_event(fake_cluster, "n1", "cancelled", method)
        # consistent: not running on the node, and the inventory agrees
        assert "web1" not in fake_cluster.running("n1")
        assert (await engine.instance("web1")).admin_state is AdminState.DOWN


async def test_cancel_stop_while_stopping(fake_cluster: FakeCluster, store_path: Path) -> None:
    async with fake_cluster.engine(store_path) as engine:
        assert (await engine.wait(await engine.submit(StartInstance(instance="web1")))).state is JobState.SUCCEEDED
        fake_cluster.configure("n1", faults={"stop_instance": {"hang": True, "times": 1}})
        job_id = await engine.submit(StopInstance(instance="web1"))
        await _wait_step(engine, job_id, "stop")
        await _node_event(fake_cluster, "n1", "start", "stop_instance")
        assert await engine.cancel(job_id, reason="keep it up") is JobState.CANCELLED
        await _node_event(fake_cluster, "n1", "cancelled", "stop_instance")
        assert "web1" in fake_cluster.running("n1")
        assert (await engine.instance("web1")).admin_state is AdminState.UP
        names = [s.name for s in (await engine.get(job_id)).steps]
        assert names == ["stop", "compensate-check", "compensate-admin-state"]


async def test_step_timeout(fake_cluster: FakeCluster, store_path: Path) -> None:
    async with fake_cluster.engine(store_path) as engine:
        assert (await engine.wait(await engine.submit(StartInstance(instance="web1")))).state is JobState.SUCCEEDED
        fake_cluster.configure("n1", faults={"stop_instance": {"delay": 30, "times": 1}})
        with anyio.fail_after(20):
            job = await engine.wait(await engine.submit(StopInstance(instance="web1", deadlines={"stop": 0.5})))
        assert job.state is JobState.FAILED
        assert job.error is not None and job.error.type == "StepTimeout"
        assert job.error.step == "stop" and job.error.node == "n1"
        assert "0.5s" in job.error.message and "'stop'" in job.error.message and "n1" in job.error.message
        step = next(s for s in job.steps if s.name == "stop")
        assert step.state.value == "timed-out"
        await _node_event(fake_cluster, "n1", "cancelled", "stop_instance")
        # compensation recorded reality: still running, still up
        assert "web1" in fake_cluster.running("n1")
        assert (await engine.instance("web1")).admin_state is AdminState.UP


async def test_two_instances_in_parallel_on_real_nodes(fake_cluster: FakeCluster, store_path: Path) -> None:
    async with fake_cluster.engine(store_path) as engine:
        fake_cluster.configure("n1", faults={"start_instance": {"hang": True, "times": 1}})
        blocked = await engine.submit(StartInstance(instance="web1"))
        await _wait_step(engine, blocked, "start")
        queued_same = await engine.submit(StopInstance(instance="web1"))
        other = await engine.wait(await engine.submit(StartInstance(instance="web2")))
        assert other.state is JobState.SUCCEEDED
        assert (await engine.get(queued_same)).state is JobState.WAITING
        await engine.cancel(blocked, reason="unblock")
        assert (await engine.wait(queued_same)).state is JobState.SUCCEEDED


async def test_node_killed_mid_job_fails_with_node_unreachable(tmp_path: Path, store_path: Path) -> None:
    from transport.testing import LocalCluster

    from .conftest import default_instances

    async with LocalCluster(n=2, base_dir=tmp_path / "cluster", hypervisor="fake", keepalive_interval=0.5, keepalive_count_max=2) as lc:
        fc = FakeCluster("ssh", lc.config, {n: lc.state_dir(n) for n in ("n1", "n2")}, default_instances(), lc=lc)
        async with fc.engine(store_path, node_ping_interval=0.5) as engine:
            assert (await engine.wait(await engine.submit(StartInstance(instance="web1")))).state is JobState.SUCCEEDED
            fc.configure("n1", faults={"stop_instance": {"hang": True}})
            job_id = await engine.submit(StopInstance(instance="web1"))
            await _wait_step(engine, job_id, "stop")
            await _node_event(fc, "n1", "start", "stop_instance")
            await lc.kill("n1")
            killed_at = anyio.current_time()
            with anyio.fail_after(15):
                job = await engine.wait(job_id)
            elapsed = anyio.current_time() - killed_at
            assert job.state is JobState.FAILED
            assert job.error is not None and job.error.is_a("NodeUnreachable"), job.error
            assert job.error.node == "n1"
            # keepalive bound: 0.5 s × 2, plus the ping timeout and slack
            assert elapsed < 6.0, elapsed
            # the stop's outcome on n1 is unknown: recorded for a later Reconcile
            pending = (await engine.instance("web1")).pending_cleanup
            assert [(p.node, p.job_id) for p in pending] == [("n1", job_id)] and "unreachable" in pending[0].reason
            n1 = next(n for n in engine.nodes() if n.name == "n1")
            assert not n1.online and n1.error
            # jobs that need the node fail fast with the reason
            fast = await engine.wait(await engine.submit(RebootInstance(instance="web1")))
            assert fast.state is JobState.FAILED and fast.error is not None and fast.error.type == "NodeOffline"
            cluster_events = [e.kind for e in await engine.store.events(None)]
            assert "node-offline" in cluster_events


async def test_idempotent_reads_retry_state_changes_do_not(local_cluster: FakeCluster, store_path: Path) -> None:
    from transport.errors import NodeUnreachable

    async with local_cluster.engine(store_path) as engine:
        faults = engine.transport.faults
        faults.inject("n1", "get_instance_info", error=NodeUnreachable("blip", node="n1"), times=2)
        job = await engine.wait(await engine.submit(StartInstance(instance="web1")))
        assert job.state is JobState.SUCCEEDED, job.error
        assert job.steps[0].name == "check-state" and job.steps[0].attempts == 3

        faults.inject("n1", "reboot_instance", error=NodeUnreachable("lost", node="n1"), times=1)
        job = await engine.wait(await engine.submit(RebootInstance(instance="web1")))
        assert job.state is JobState.FAILED and job.error is not None and job.error.type == "NodeUnreachable"
        reboot = next(s for s in job.steps if s.name == "reboot")
        assert reboot.attempts == 1 and reboot.state.value == "failed"
        # compensation still reached the node and left the instance running
        assert "web1" in local_cluster.running("n1")
        assert (await engine.instance("web1")).admin_state is AdminState.UP
        # the node was marked offline by the failure, and is probed back online
        with anyio.fail_after(10):
            while not all(n.online for n in engine.nodes()):
                await anyio.sleep(0.05)
        assert [e.kind for e in await engine.store.events(None) if e.kind.startswith("node-")] == ["node-offline", "node-online"]


@pytest.mark.parametrize("reboot_type", ["soft", "hard"])
async def test_cancel_reboot_mid_step_leaves_instance_running(fake_cluster: FakeCluster, store_path: Path, reboot_type: str) -> None:
    method, step = ("reboot_instance", "reboot") if reboot_type == "soft" else ("start_instance", "start")
    async with fake_cluster.engine(store_path) as engine:
        assert (await engine.wait(await engine.submit(StartInstance(instance="web1")))).state is JobState.SUCCEEDED
        fake_cluster.configure("n1", faults={method: {"hang": True, "times": 1}})
        job_id = await engine.submit(RebootInstance(instance="web1", reboot_type=reboot_type))
        await _wait_step(engine, job_id, step)
        await _node_event(fake_cluster, "n1", "start", method, count=2 if method == "start_instance" else 1)
        assert await engine.cancel(job_id, reason="not now") is JobState.CANCELLED
        await _node_event(fake_cluster, "n1", "cancelled", method)
        # compensation: the instance ran before the job, so it runs after it
        assert "web1" in fake_cluster.running("n1")
        assert (await engine.instance("web1")).admin_state is AdminState.UP
        steps = [s.name for s in (await engine.get(job_id)).steps]
        assert steps[-2:] == (["compensate-check", "compensate-admin-up"] if reboot_type == "soft" else ["compensate-start", "compensate-admin-up"])
