"""The engine SIGKILLed at each migration step, reopened: the job settles from the nodes' real state.

The engine runs in a subprocess (``tests.engine.engine_proc``) with its fake
nodes in-process (``transport = "local"``): the kill takes the migration
stream with it, exactly what an engine host losing power does. The state
directories survive; the reopened engine's ``recover()`` reconciles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

import hv
from engine import AdminState, Engine, JobState
from hv.fake import FakeHypervisor
from tests.engine.test_crash import run_until_step

from .conftest import MIB, spec

pytestmark = pytest.mark.anyio

def write_cluster(tmp: Path) -> Path:
    lines = ['[cluster]', 'name = "crash"', 'transport = "local"', 'hypervisor = "fake"']
    for node in ("n1", "n2"):
        lines += [f"[nodes.{node}]", f'hv_options = {{ state_dir = "{tmp / node}" }}']
    lines += ['[instances.web1]', 'primary = "n1"', 'admin_state = "up"', "beparams = { minmem = 128, maxmem = 128, vcpus = 1 }"]
    path = tmp / "cluster.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# (step to kill at, faults per node that hold the step, expected job state, node web1 ends on)
HANG = {"hang": True, "times": 1}
SCENARIOS = [
    ("check-source", {"n1": {"get_instance_info": HANG}}, "failed", "n1"),
    ("migration_info", {"n1": {"migration_info": HANG}}, "failed", "n1"),
    ("accept_instance", {"n2": {"accept_instance": HANG}}, "failed", "n1"),
    ("migrate_instance", {"n1": {"migrate_instance": HANG}}, "failed", "n1"),
    ("monitor", {}, "failed", "n1"),
    ("finalize_migration_dst", {"n2": {"finalize_migration_dst": HANG}}, "succeeded", "n2"),
    ("finalize_migration_source", {"n1": {"finalize_migration_source": HANG}}, "succeeded", "n2"),
    # killed while rolling back a failed step: the next engine finishes the rollback
    ("rollback-finalize-dst", {"n1": {"migrate_instance": {"error": "boom", "times": 1}}, "n2": {"finalize_migration_dst": HANG}}, "failed", "n1"),
]


@pytest.mark.parametrize(("step", "faults", "expected", "ends_on"), SCENARIOS, ids=[s[0] for s in SCENARIOS])
async def test_engine_killed_at_migration_step(tmp_path: Path, step: str, faults: dict[str, Any], expected: str, ends_on: str) -> None:
    cluster = write_cluster(tmp_path)
    store = tmp_path / "herd.db"
    async with FakeHypervisor(tmp_path / "n1", node="n1") as n1:
        await n1.start_instance(spec("web1", mem=128))
    for n in ("n1", "n2"):
        FakeHypervisor.configure(tmp_path / n, bandwidth=32 * MIB)  # 4 s of copying: the kill lands mid-copy
    for node, node_faults in faults.items():
        FakeHypervisor.configure(tmp_path / node, faults=node_faults)
    job_id = await run_until_step(store, cluster, {"kind": "migrate", "instance": "web1", "target": "n2"}, step, tmp_path / "engine.log")
    for n in ("n1", "n2"):
        FakeHypervisor.configure(tmp_path / n, faults={}, bandwidth=1024 * MIB)

    async with Engine.open(store=store, cluster=cluster, node_ping_interval=None) as engine:
        with anyio.fail_after(30):
            job = await engine.wait(job_id)
        assert job.state.value == expected, (job.state, job.error, job.result)
        assert job.result["recovered"] is True
        found = {}
        for n in ("n1", "n2"):
            info = await engine.transport.node(n).get_instance_info("web1")
            if info is not None:
                found[n] = hv.HvInstanceState(info.state).value
        # the invariant: running once, where the inventory says
        assert found == {ends_on: "running"}, found
        record = await engine.instance("web1")
        assert record.primary == ends_on and record.admin_state is AdminState.UP
        assert record.pending_cleanup == ()
        assert [e for e in await engine.store.events(job_id) if e.kind == "reconcile"] or step == "check-source"
