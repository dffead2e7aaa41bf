"""Real QEMU through the engine: a live migration with progress, a cancel mid-way, and a
guest that keeps dirtying its memory (tests/guest) hitting the convergence policy.

TCG by default (``HERD_QEMU_ACCEL=kvm`` for KVM). These tests need
qemu-system-x86_64 and gcc; they fail (not skip) when either is missing,
except the explicit skip below when the QEMU binary itself is absent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import pytest_asyncio

import hv
from engine import AdminState, Cluster, Engine, InstanceRecord, JobState, Migrate
from tests._real import require_binary
from tests.hv_qemu.conftest import ACCEL, kill_qemus_under
from transport import LocalTransport

pytestmark = [pytest.mark.qemu, pytest.mark.anyio]

BANNER = b"herd-dirty-kernel: dirtying memory"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def dirty_kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.guest.build import build_dirty_kernel

    return build_dirty_kernel(tmp_path_factory.mktemp("guest"))


def vm(name: str = "vm1", mem: int = 128, **hvparams: Any) -> hv.Instance:
    hvparams.setdefault("accel", ACCEL)
    return hv.Instance(name=name, hypervisor="kvm", hvparams=hvparams, beparams=hv.BeParams(minmem=mem, maxmem=mem, vcpus=1))


@pytest_asyncio.fixture
async def kvm_engine(tmp_path: Path) -> AsyncIterator[Any]:
    """``make(spec)``: an engine over two kvm nodes (LocalTransport) with ``spec`` in its inventory."""
    require_binary("qemu-system-x86_64", "qemu-system-x86")
    drivers = {n: hv.get_hypervisor("kvm", run_dir=tmp_path / n, node=n, qmp_timeout=5.0) for n in ("n1", "n2")}
    try:
        async with LocalTransport(drivers, owns_drivers=True) as transport:

            def make(spec: hv.Instance) -> Any:
                records = {spec.name: InstanceRecord(name=spec.name, spec=spec, primary="n1", admin_state=AdminState.UP)}
                return Engine.open(store=tmp_path / "herd.db", cluster=Cluster(instances=records), transport=transport, node_ping_interval=None)

            yield make, drivers
    finally:
        kill_qemus_under(tmp_path)


async def boot_dirty(driver: Any, spec: hv.Instance) -> None:
    """Start the dirty-memory guest and wait until it says it is dirtying."""
    await driver.start_instance(spec, startup_paused=True)
    console = await driver.get_instance_console(spec)
    assert console.path is not None
    async with await anyio.connect_unix(console.path) as stream:
        await driver.qmp_command(spec.name, "cont")
        seen = b""
        with anyio.fail_after(30):
            while BANNER not in seen:
                seen += await stream.receive()


async def runs_only_on(drivers: dict[str, Any], name: str, node: str) -> None:
    for n, d in drivers.items():
        info = await d.get_instance_info(name)
        if n == node:
            assert info is not None and info.state == "running", (n, info)
        else:
            assert info is None, (n, info)


async def test_live_migration_through_the_engine(kvm_engine) -> None:
    make, drivers = kvm_engine
    spec = vm(mem=128)
    async with make(spec) as engine:
        await drivers["n1"].start_instance(spec)
        began = anyio.current_time()
        job_id = await engine.submit(Migrate(instance="vm1", target="n2"))
        job = await engine.wait(job_id)
        wall = anyio.current_time() - began
        assert job.state is JobState.SUCCEEDED, job.error
        progress = [e.data for e in await engine.store.events(job_id) if e.kind == "progress" and e.data.get("step") == "monitor"]
        assert progress and progress[-1]["percent"] == 100.0 and progress[-1]["ram_total"] > 0
        assert [p["percent"] for p in progress] == sorted(p["percent"] for p in progress)
        assert job.result["total_time_ms"] and job.result["total_time_ms"] > 0
        # the job's wall time beside QEMU's own total-time (printed for the report)
        print(f"\nQEMU live migration: job wall {wall * 1000:.0f} ms (in job {job.result['wall_time_s'] * 1000:.0f} ms), "
              f"QEMU total-time {job.result['total_time_ms']} ms, downtime {job.result['downtime_ms']} ms")
        await runs_only_on(drivers, "vm1", "n2")
        assert (await engine.instance("vm1")).primary == "n2"


async def test_cancel_a_real_migration_mid_way(kvm_engine, dirty_kernel: Path) -> None:
    make, drivers = kvm_engine
    spec = vm(mem=256, kernel_path=str(dirty_kernel), migration_bandwidth=64)
    async with make(spec) as engine:
        await boot_dirty(drivers["n1"], spec)
        job_id = await engine.submit(Migrate(instance="vm1", target="n2", policy={"stall_window": 600.0}))
        async for event in engine.watch(job_id):
            if event.kind == "progress" and event.data.get("ram_transferred", 0) > 16 << 20:
                break
        began = anyio.current_time()
        state = await engine.cancel(job_id, "operator")
        latency = anyio.current_time() - began
        assert state is JobState.CANCELLED
        print(f"\nQEMU cancel -> rolled back (job cancelled, instance proven on n1): {latency * 1000:.0f} ms")
        await runs_only_on(drivers, "vm1", "n1")
        assert (await engine.instance("vm1")).primary == "n1"


async def test_real_non_converging_migration_hits_the_policy(kvm_engine, dirty_kernel: Path) -> None:
    make, drivers = kvm_engine
    spec = vm(mem=256, kernel_path=str(dirty_kernel), migration_bandwidth=128)
    async with make(spec) as engine:
        await boot_dirty(drivers["n1"], spec)
        policy = {"stall_window": 1.5, "downtime_start_ms": 30, "downtime_step_ms": 30, "downtime_max_ms": 90, "on_timeout": "force-complete"}
        job_id = await engine.submit(Migrate(instance="vm1", target="n2", policy=policy))
        job = await engine.wait(job_id)
        assert job.state is JobState.SUCCEEDED, job.error
        actions = [e.data["action"] for e in await engine.store.events(job_id) if e.kind == "policy"]
        assert actions[0] == "raise-downtime" and "force-complete" in actions, actions
        assert actions.count("raise-downtime") >= 3  # the start, then step by step to the cap
        await runs_only_on(drivers, "vm1", "n2")


async def test_engine_killed_mid_qemu_migration_recovers_from_qemu(tmp_path: Path, dirty_kernel: Path) -> None:
    """QEMU outlives a SIGKILLed engine and finishes the copy alone; the next engine settles it forward."""
    require_binary("qemu-system-x86_64", "qemu-system-x86")
    from tests.engine.test_crash import run_until_step

    # A downtime allowance above one pass's time: the copy converges ~4 s after it starts.
    hvparams = {"accel": ACCEL, "kernel_path": str(dirty_kernel), "migration_bandwidth": 64, "migration_downtime": 6000}
    spec = vm(mem=256, **hvparams)
    lines = ['[cluster]', 'name = "qcrash"', 'transport = "local"', 'hypervisor = "kvm"']
    for node in ("n1", "n2"):
        lines += [f"[nodes.{node}]", f'hv_options = {{ run_dir = "{tmp_path / node}", qmp_timeout = 5.0 }}']
    lines += ["[instances.vm1]", 'primary = "n1"', 'hypervisor = "kvm"', 'admin_state = "up"',
              "beparams = { minmem = 256, maxmem = 256, vcpus = 1 }",
              "hvparams = { " + ", ".join(f"{k} = {v!r}".replace("'", '"') for k, v in hvparams.items()) + " }"]
    cluster = tmp_path / "cluster.toml"
    cluster.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        n1 = hv.get_hypervisor("kvm", run_dir=tmp_path / "n1", node="n1", qmp_timeout=5.0)
        try:
            await boot_dirty(n1, spec)
        finally:
            await n1.aclose()
        store = tmp_path / "herd.db"
        job_id = await run_until_step(store, cluster, {"kind": "migrate", "instance": "vm1", "target": "n2"}, "monitor", tmp_path / "engine.log")
        # The engine is dead; QEMU carries on. Watch it finish (an external process: poll with a deadline).
        n1 = hv.get_hypervisor("kvm", run_dir=tmp_path / "n1", node="n1", qmp_timeout=5.0)
        try:
            with anyio.fail_after(40):
                while not (await n1.get_migration_status(spec, wait=1.0)).is_final:
                    pass
            assert (await n1.get_migration_status(spec)).status == "completed"
        finally:
            await n1.aclose()
        async with Engine.open(store=store, cluster=cluster, node_ping_interval=None) as engine:
            with anyio.fail_after(60):
                job = await engine.wait(job_id)
            assert job.state is JobState.SUCCEEDED, (job.error, job.result)
            assert job.result["recovered"] is True and job.result["node"] == "n2"
            print("\nrecovered:", job.result["actions"], [s.name for s in job.steps][-8:])
            for node, expected in (("n1", None), ("n2", "running")):
                info = await engine.transport.node(node).get_instance_info("vm1")
                assert (info.state if info else None) == expected, (node, info)
            assert (await engine.instance("vm1")).primary == "n2"
    finally:
        kill_qemus_under(tmp_path)
