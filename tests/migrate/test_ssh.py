"""Fake nodes over real SSH (asyncssh servers, agents as subprocesses): nodes killed mid-way."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

import hv
from engine import AdminState, Cluster, Engine, InstanceRecord, JobState, Migrate
from hv.fake import FakeHypervisor
from tests.transport.cluster_fixtures import make_local_cluster  # noqa: F401  (fixture)

from .conftest import MIB, spec

pytestmark = pytest.mark.anyio


async def where(engine: Engine, name: str) -> dict[str, str]:
    found = {}
    for node in engine.node_names:
        info = await engine.transport.node(node).get_instance_info(name)
        if info is not None:
            found[node] = hv.HvInstanceState(info.state).value
    return found


async def pending_cleared(engine: Engine, name: str) -> None:
    with anyio.fail_after(30):
        while (await engine.instance(name)).pending_cleanup:
            await anyio.sleep(0.05)


def _open(lc, tmp_path: Path):
    records = {"web1": InstanceRecord(name="web1", spec=spec(), primary="n1", admin_state=AdminState.UP)}
    return Engine.open(store=tmp_path / "herd.db", cluster=Cluster(config=lc.config, instances=records), node_ping_interval=None)


async def test_target_killed_mid_migration(make_local_cluster, tmp_path: Path) -> None:
    async with make_local_cluster(n=2) as lc:
        for node in ("n1", "n2"):
            FakeHypervisor.configure(lc.state_dir(node), bandwidth=32 * MIB)
        async with _open(lc, tmp_path) as engine:
            await engine.transport.node("n1").start_instance(spec())
            job_id = await engine.submit(Migrate(instance="web1", target="n2"))
            async for event in engine.watch(job_id):
                if event.kind == "progress" and event.data.get("percent", 0) > 10:
                    break
            await lc.kill("n2")
            job = await engine.wait(job_id)
            assert job.state is JobState.FAILED
            assert "runs on n1" in job.error.message
            assert (await engine.transport.node("n1").get_instance_info("web1")).state == "running"
            record = await engine.instance("web1")
            assert record.primary == "n1" and [p.node for p in record.pending_cleanup] == ["n2"]
            # n2 comes back with its half-received copy: cleaned automatically
            await lc.restart("n2")
            await pending_cleared(engine, "web1")
            assert await where(engine, "web1") == {"n1": "running"}


async def test_source_killed_after_completion_ends_on_the_target(make_local_cluster, tmp_path: Path) -> None:
    async with make_local_cluster(n=2) as lc:
        FakeHypervisor.configure(lc.state_dir("n2"), faults={"finalize_migration_dst": {"delay": 1.0, "times": 1}})
        async with _open(lc, tmp_path) as engine:
            await engine.transport.node("n1").start_instance(spec())
            job_id = await engine.submit(Migrate(instance="web1", target="n2"))
            async for event in engine.watch(job_id):
                if event.kind == "step-start" and event.data.get("step") == "finalize_migration_dst":
                    break
            await lc.kill("n1")
            job = await engine.wait(job_id)
            assert job.state is JobState.SUCCEEDED, job.error
            assert job.result["pending_cleanup"] and job.result["node"] == "n2"
            record = await engine.instance("web1")
            assert record.primary == "n2" and [p.node for p in record.pending_cleanup] == ["n1"]
            # the source returns holding its migrated-away (paused) copy: cleaned automatically
            await lc.restart("n1")
            await pending_cleared(engine, "web1")
            assert await where(engine, "web1") == {"n2": "running"}
