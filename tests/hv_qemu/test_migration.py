"""Real QEMU migrations between two driver objects with separate runtime directories."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anyio
import pytest

import hv
from hv.qemu import QemuHypervisor

from .conftest import Nodes, instance, qemu_pids_under, wait_status

pytestmark = [pytest.mark.qemu, pytest.mark.asyncio]


def _pid(drv: QemuHypervisor, name: str = "vm1") -> int:
    pid = drv.run_dir.pid(name)
    assert pid is not None
    return pid


async def _setup(nodes: Nodes, inst: hv.Instance) -> tuple[QemuHypervisor, QemuHypervisor, str, str]:
    src, dst = nodes.make("src"), nodes.make("dst", port_range=(49500, 49509))
    await src.start_instance(inst)
    info = await src.migration_info(inst)
    target = await dst.accept_instance(inst, info, "127.0.0.1")
    return src, dst, info, target


async def test_live_migration_prefilled(nodes: Nodes, prefilled_256: Path) -> None:
    # 256 MiB at 64 MiB/s: about four seconds of copying, so the 1 s long polls below
    # see it active several times even on a starved machine (at 1 GiB/s it could be
    # over before the first poll returned).
    inst = instance(mem=256, mem_path=str(prefilled_256), migration_bandwidth=64)
    src, dst, info, target = await _setup(nodes, inst)
    assert target.startswith("tcp:127.0.0.1:495")
    incoming = await dst.get_instance_info("vm1")
    assert incoming is not None and (incoming.state, incoming.runstate) == (hv.HvInstanceState.INCOMING, "inmigrate")
    src_pid = _pid(src)

    began = anyio.current_time()
    await src.migrate_instance(inst, target, live=True)
    seen: list[hv.MigrationStatus] = []
    with anyio.fail_after(30):
        while not (st := await src.get_migration_status(inst, wait=1.0)).is_final:
            seen.append(st)
    wall = anyio.current_time() - began
    assert st.status == "completed", st
    assert any(s.status == "active" and 0 < s.ram_transferred for s in seen), seen
    assert st.ram_transferred >= 250 << 20  # the random RAM really crossed (no zero pages)
    assert st.total_time_ms and st.total_time_ms > 0 and st.downtime_ms is not None
    assert (await src.get_instance_info("vm1")).runstate == "postmigrate"  # type: ignore[union-attr]

    # The pitfall: never resume a source whose migration completed.
    with pytest.raises(hv.MigrationError, match="refusing to resume"):
        await src.finalize_migration_source(inst, success=False, live=True)
    assert (await src.get_instance_info("vm1")).runstate == "postmigrate"  # type: ignore[union-attr]

    await dst.finalize_migration_dst(inst, info, success=True)
    await src.finalize_migration_source(inst, success=True, live=True)
    moved = await dst.get_instance_info("vm1")
    assert moved is not None and moved.state is hv.HvInstanceState.RUNNING and moved.memory == 256
    assert await src.list_instances() == [] and src_pid not in qemu_pids_under(nodes.root)
    rt = dst.run_dir.read_runtime("vm1")
    assert rt is not None and rt.incoming_port is None
    print(f"\nlive migration 256 MiB prefilled: total {st.total_time_ms} ms, downtime {st.downtime_ms} ms, wall {wall:.3f} s")


async def test_cancel_midway_source_runs_again(nodes: Nodes, prefilled_256: Path) -> None:
    inst = instance(mem=256, mem_path=str(prefilled_256), migration_bandwidth=32)
    src, dst, info, target = await _setup(nodes, inst)
    await src.migrate_instance(inst, target, live=True)
    # QEMU computes the rate per interval (~100 ms): the first readings say 0.
    st = await wait_status(src, inst, lambda s: s.status == "active" and bool(s.rate_bps))
    assert st.ram_remaining > 64 << 20 and st.ram_transferred > 0 and st.rate_bps and st.rate_bps < 64e6

    began = anyio.current_time()
    await src.finalize_migration_source(inst, success=False, live=True)
    cancel_s = anyio.current_time() - began
    assert (await src.get_migration_status(inst)).status == "cancelled"
    info_src = await src.get_instance_info("vm1")
    assert info_src is not None and info_src.runstate == "running"

    await dst.finalize_migration_dst(inst, info, success=False)
    assert await dst.list_instances() == []
    assert not dst.run_dir.dir("vm1").exists()
    print(f"\ncancel → source running: {cancel_s * 1000:.1f} ms")


async def test_target_killed_midway(nodes: Nodes, prefilled_256: Path) -> None:
    inst = instance(mem=256, mem_path=str(prefilled_256), migration_bandwidth=32)
    src, dst, info, target = await _setup(nodes, inst)
    await src.migrate_instance(inst, target, live=True)
    await wait_status(src, inst, lambda s: s.status == "active" and s.ram_transferred > 0)

    os.kill(_pid(dst), signal.SIGKILL)
    st = await wait_status(src, inst, lambda s: s.is_final)
    assert st.status == "failed"
    assert (await src.get_instance_info("vm1")).runstate == "running"  # type: ignore[union-attr]
    assert await dst.get_instance_info("vm1") is None

    await src.finalize_migration_source(inst, success=False, live=True)
    await dst.finalize_migration_dst(inst, info, success=False)
    assert (await src.get_instance_info("vm1")).runstate == "running"  # type: ignore[union-attr]
    assert not dst.run_dir.dir("vm1").exists()


async def test_non_live_migration(nodes: Nodes) -> None:
    inst = instance(mem=128)
    src, dst, info, target = await _setup(nodes, inst)
    await src.migrate_instance(inst, target, live=False)
    st = await wait_status(src, inst, lambda s: s.is_final)
    assert st.status == "completed"
    # The source was paused before sending: the target arrives paused and finalize resumes it.
    await dst.finalize_migration_dst(inst, info, success=True)
    await src.finalize_migration_source(inst, success=True, live=False)
    moved = await dst.get_instance_info("vm1")
    assert moved is not None and moved.runstate == "running"
    assert await src.list_instances() == []


async def test_non_live_failure_resumes_source(nodes: Nodes) -> None:
    """migrate to a port nowhere listens: QEMU says success, query-migrate says failed."""
    src = nodes.make("src")
    inst = instance(mem=64)
    await src.start_instance(inst)
    await src.migrate_instance(inst, "tcp:127.0.0.1:9", live=False)
    assert (await src.get_instance_info("vm1")).runstate in ("paused", "finish-migrate")  # type: ignore[union-attr]
    st = await wait_status(src, inst, lambda s: s.is_final)
    assert st.status == "failed" and st.error
    await src.finalize_migration_source(inst, success=False, live=False)
    assert (await src.get_instance_info("vm1")).runstate == "running"  # type: ignore[union-attr]


async def test_accept_allocates_distinct_ports_and_checks_input(nodes: Nodes) -> None:
    src, dst = nodes.make("src"), nodes.make("dst", port_range=(49600, 49601))
    a, b = instance(name="a", mem=64), instance(name="b", mem=64)
    await src.start_instance(a)
    await src.start_instance(b)
    ta = await dst.accept_instance(a, await src.migration_info(a), "")
    tb = await dst.accept_instance(b, await src.migration_info(b), "")
    assert {ta, tb} == {"tcp:127.0.0.1:49600", "tcp:127.0.0.1:49601"}
    c = instance(name="c", mem=64)
    await src.start_instance(c)
    with pytest.raises(hv.MigrationError, match="no free migration port"):
        await dst.accept_instance(c, await src.migration_info(c), "")
    assert not dst.run_dir.dir("c").exists()  # the refused target's QEMU is gone

    with pytest.raises(hv.MigrationError, match="malformed migration info"):
        await dst.accept_instance(c, "{not json", "")
    with pytest.raises(hv.MigrationError, match="is for instance 'a'"):
        await dst.accept_instance(c, await src.migration_info(a), "")
    with pytest.raises(hv.MigrationError, match="bad migration target"):
        await src.migrate_instance(a, "127.0.0.1; rm -rf /", live=True)
    # Both migrations run at once, each to its own port.
    await src.migrate_instance(a, ta, live=True)
    await src.migrate_instance(b, tb, live=True)
    for inst in (a, b):
        assert (await wait_status(src, inst, lambda s: s.is_final)).status == "completed"
        await dst.finalize_migration_dst(inst, "", success=True)
        await src.finalize_migration_source(inst, success=True, live=True)
    assert await dst.list_instances() == ["a", "b"]


async def test_migration_carries_hotplugged_devices(nodes: Nodes) -> None:
    """The target is started with what was hotplugged on the source, or the device states would not match."""
    inst = instance(mem=64, hotplug_slots=1)
    src, dst = nodes.make("src"), nodes.make("dst")
    await src.start_instance(inst)
    await src.hot_add_device(inst, "nic", hv.Nic(mac="52:54:00:aa:bb:cc"), None, 3)
    info = await src.migration_info(inst)
    target = await dst.accept_instance(inst, info, "")
    await src.migrate_instance(inst, target, live=True)
    assert (await wait_status(src, inst, lambda s: s.is_final)).status == "completed"
    await dst.finalize_migration_dst(inst, info, success=True)
    await src.finalize_migration_source(inst, success=True, live=True)
    mac = await dst.qmp_command("vm1", "qom-get", {"path": "/machine/peripheral/hotnic3", "property": "mac"})
    assert mac == "52:54:00:aa:bb:cc"
    rt = dst.run_dir.read_runtime("vm1")
    assert rt is not None and [d.device_id for d in rt.hotplugged] == ["hotnic3"]
