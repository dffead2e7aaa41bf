"""Real QEMU: start, info, list, console, reboot, balloon, hotplug, stop escalation, agent restart."""

from __future__ import annotations

import os
import re
import signal
import stat

import anyio
import msgspec
import pytest

import hv
from hv import _process
from hv.qemu import QmpCommandError

from .conftest import ACCEL, Nodes, instance, qemu_pids_under

pytestmark = [pytest.mark.qemu, pytest.mark.asyncio]


async def test_start_info_list_console_files(nodes: Nodes) -> None:
    drv = nodes.make("n1")
    inst = instance(mem=256, vcpus=2)
    began = anyio.current_time()
    await drv.start_instance(inst)
    assert anyio.current_time() - began < 10

    info = await drv.get_instance_info("vm1")
    assert info is not None
    assert (info.state, info.runstate, info.memory, info.vcpus) == (hv.HvInstanceState.RUNNING, "running", 256, 2)
    assert info.id in qemu_pids_under(nodes.root)
    assert await drv.list_instances() == ["vm1"]
    assert [i.name for i in await drv.get_all_instances_info()] == ["vm1"]
    assert await drv.get_instance_info("other") is None

    console = await drv.get_instance_console(inst)
    assert console.kind == "unix-socket" and console.path is not None
    assert stat.S_ISSOCK(os.stat(console.path).st_mode)

    inst_dir = drv.run_dir.dir("vm1")
    assert stat.S_IMODE(os.stat(inst_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(inst_dir / "runtime.json").st_mode) == 0o600
    rt = drv.run_dir.read_runtime("vm1")
    assert rt is not None and rt.accel == (ACCEL if ACCEL != "auto" else rt.accel) and "-daemonize" in rt.argv

    node = await drv.get_node_info()
    assert node.hv_name == "kvm" and node.hv_version.count(".") == 2
    assert node.memory_free < hv.get_linux_node_info().memory_free  # the guest's promised RAM is not free
    assert await drv.verify() is None

    with pytest.raises(hv.HypervisorError, match="already running"):
        await drv.start_instance(inst)


async def test_start_paused_and_bad_params(nodes: Nodes) -> None:
    drv = nodes.make("n1")
    await drv.start_instance(instance(mem=64), startup_paused=True)
    info = await drv.get_instance_info("vm1")
    assert info is not None and (info.state, info.runstate) == (hv.HvInstanceState.PAUSED, "prelaunch")

    with pytest.raises(hv.ParameterError, match="accel"):
        await drv.start_instance(instance(name="vm2", accel="xen"))
    with pytest.raises(hv.ParameterError, match="kernel_path"):
        await drv.start_instance(instance(name="vm2", kernel_path="/nonexistent/vmlinuz"))
    with pytest.raises(hv.HypervisorError, match="invalid instance name"):
        await drv.start_instance(instance(name="../evil"))
    # QEMU refuses the machine type: the error carries QEMU's message and nothing is left behind.
    with pytest.raises(hv.HypervisorError, match="QEMU failed to start.*unsupported machine type"):
        await drv.start_instance(instance(name="vm2", machine_type="no-such-machine"))
    assert await drv.list_instances() == ["vm1"]
    assert not drv.run_dir.dir("vm2").exists()


async def test_reboot_balloon_and_raw_qmp(nodes: Nodes) -> None:
    drv = nodes.make("n1")
    inst = instance(mem=128)
    await drv.start_instance(inst)
    pid = (await drv.get_instance_info("vm1")).id  # type: ignore[union-attr]
    await drv.reboot_instance(inst)  # returns once QEMU reported RESET
    info = await drv.get_instance_info("vm1")
    assert info is not None and info.runstate == "running" and info.id == pid

    await drv.balloon_instance_memory(inst, 96)
    # No guest balloon driver: QEMU keeps the target, the guest keeps its RAM.
    assert (await drv.qmp_command("vm1", "query-balloon"))["actual"] == 128 << 20
    for bad in (0, 129):
        with pytest.raises(hv.ParameterError, match="balloon target"):
            await drv.balloon_instance_memory(inst, bad)
    with pytest.raises(QmpCommandError) as err:
        await drv.qmp_command("vm1", "no-such-command")
    assert err.value.error_class == "CommandNotFound" and "vm1" in str(err.value)


async def test_vnc_console(nodes: Nodes) -> None:
    drv = nodes.make("n1")
    inst = instance(mem=64, vnc_bind_address="127.0.0.1", serial_console=False)
    await drv.start_instance(inst)
    console = await drv.get_instance_console(inst)
    assert console.kind == "vnc" and console.host == "127.0.0.1" and console.port is not None and 5900 <= console.port < 6000
    async with await anyio.connect_tcp(console.host, console.port) as stream:
        assert (await stream.receive())[:4] == b"RFB "


async def test_tap_nic_when_root(nodes: Nodes) -> None:
    """A routed NIC gets a TAP device on this node (root and /dev/net/tun); user networking otherwise."""
    drv = nodes.make("n1")
    nics = (
        hv.Nic(mac="52:54:00:00:00:01", mode=hv.NicMode.ROUTED),
        hv.Nic(mac="52:54:00:00:00:02", mode=hv.NicMode.USER),
        hv.Nic(mac="52:54:00:00:00:03", mode=hv.NicMode.ROUTED),
    )
    inst = msgspec.structs.replace(instance(mem=64), nics=nics)
    await drv.start_instance(inst)
    rt = drv.run_dir.read_runtime("vm1")
    assert rt is not None
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        assert rt.taps == [None, None, None]  # fell back to user networking
        return
    first, user, second = rt.taps
    assert user is None and first and second and first != second and first.startswith("gnt.com.")
    for tap in (first, second):
        shown = await anyio.run_process(["ip", "-o", "link", "show", "dev", tap])
        assert b"UP" in shown.stdout
    await drv.stop_instance(inst, force=True)
    gone = await anyio.run_process(["ip", "-o", "link", "show", "dev", first], check=False)
    assert gone.returncode != 0


async def test_hotplug_nic_and_disk(nodes: Nodes) -> None:
    drv = nodes.make("n1", qmp_timeout=2.0)
    inst = instance(mem=64, hotplug_slots=2)
    await drv.start_instance(inst)
    await drv.verify_hotplug_support(inst, "add", "nic")
    await drv.hotplug_supported(inst)
    with pytest.raises(hv.HotplugError):
        await drv.verify_hotplug_support(inst, "modify", "nic")

    nic = hv.Nic(mac="52:54:00:12:34:56")
    await drv.hot_add_device(inst, "nic", nic, None, 0)
    peripherals = {p["name"] for p in await drv.qmp_command("vm1", "qom-list", {"path": "/machine/peripheral"})}
    assert "hotnic0" in peripherals
    mac = await drv.qmp_command("vm1", "qom-get", {"path": "/machine/peripheral/hotnic0", "property": "mac"})
    assert mac == nic.mac
    with pytest.raises(hv.HotplugError, match="already plugged"):
        await drv.hot_add_device(inst, "nic", nic, None, 0)

    disk_path = nodes.root / "extra.img"
    disk_path.write_bytes(b"\0" * (1 << 20))
    await drv.hot_add_device(inst, "disk", hv.Disk(path=str(disk_path)), None, 1)
    blocks = {b.get("qdev") for b in await drv.qmp_command("vm1", "query-block")}
    assert any("hotdisk1" in str(q) for q in blocks)
    # SCSI unplug needs no guest: the disk really goes away.
    await drv.hot_del_device(inst, "disk", None, None, 1)
    peripherals = {p["name"] for p in await drv.qmp_command("vm1", "qom-list", {"path": "/machine/peripheral"})}
    assert "hotdisk1" not in peripherals
    rt = drv.run_dir.read_runtime("vm1")
    assert rt is not None and [d.device_id for d in rt.hotplugged] == ["hotnic0"]

    # PCI unplug needs the guest's ACPI cooperation; this guest has no OS: a clear error, not a hang.
    with pytest.raises(hv.HotplugError, match="did not release hotnic0"):
        await drv.hot_del_device(inst, "nic", None, None, 0)


async def test_stop_escalates_when_guest_ignores_acpi(nodes: Nodes) -> None:
    drv = nodes.make("n1", stop_grace=1.0)
    inst = instance(mem=64)
    await drv.start_instance(inst)
    pid = (await drv.get_instance_info("vm1")).id  # type: ignore[union-attr]

    result = await drv.stop_instance(inst, timeout=0.5)
    assert result.stage is hv.StopStage.MONITOR and result.hard
    soft, hard = result.stages
    assert soft.stage is hv.StopStage.SOFT and not soft.ended_it and soft.seconds >= 0.5
    assert hard.stage is hv.StopStage.MONITOR and hard.ended_it
    assert pid not in qemu_pids_under(nodes.root)
    assert not drv.run_dir.dir("vm1").exists()

    again = await drv.stop_instance(inst, retry=True)
    assert again.stage is hv.StopStage.ALREADY_STOPPED


async def test_stop_by_name_of_a_hung_qemu_reaches_sigkill(nodes: Nodes) -> None:
    """A QEMU that answers nothing (SIGSTOPped): quit times out, SIGTERM stays pending, SIGKILL ends it."""
    drv = nodes.make("n1", stop_grace=0.5, qmp_timeout=0.5)
    await drv.start_instance(instance(mem=64))
    pid = (await drv.get_instance_info("vm1")).id  # type: ignore[union-attr]
    os.kill(pid, signal.SIGSTOP)

    with pytest.raises(hv.HypervisorTimeout, match=r"vm1.*query-status"):
        await drv.get_instance_info("vm1")

    result = await drv.stop_instance(None, force=True, name="vm1")
    assert result.stage is hv.StopStage.SIGKILL
    assert [s.stage for s in result.stages] == [hv.StopStage.MONITOR, hv.StopStage.SIGTERM, hv.StopStage.SIGKILL]
    assert [s.ended_it for s in result.stages] == [False, False, True]
    assert await drv.list_instances() == []
    assert not os.path.exists(f"/proc/{pid}")  # reaped, not left a zombie
    assert drv.last_exit("vm1") == _process.ExitStatus(pid, signal=signal.SIGKILL)


def _zombie_qemu_children() -> list[int]:
    """Zombie QEMU processes (the daemon or -daemonize's middle one) whose parent is this process."""
    found = []
    for pid in _process._child_pids():
        st = _process.proc_state(pid)
        if st is not None and st.state == "Z" and st.comm.startswith("qemu-system"):
            found.append(pid)
    return found


@pytest.mark.parametrize(
    ("sig", "ended", "how"),
    [
        (signal.SIGKILL, {"signal": signal.SIGKILL}, "killed by signal 9 (SIGKILL)"),
        (signal.SIGTERM, {"code": 0}, "exited with status 0"),  # QEMU exits cleanly on SIGTERM (and removes its pidfile)
    ],
)
async def test_dead_qemu_is_reaped_reported_and_cleaned(nodes: Nodes, sig: signal.Signals, ended: dict, how: str) -> None:
    """The driver's process is QEMU's subreaper: an ended QEMU is reaped (no zombie) and reported with how it ended."""
    drv = nodes.make("n1")
    await drv.start_instance(instance(mem=64))
    pid = (await drv.get_instance_info("vm1")).id  # type: ignore[union-attr]
    assert _process.proc_state(pid).ppid == os.getpid()  # type: ignore[union-attr]  # re-parented to us
    assert _zombie_qemu_children() == []  # -daemonize's middle process was reaped at start
    os.kill(pid, sig)
    with anyio.fail_after(10):
        while await drv.list_instances():
            await anyio.sleep(0.02)

    assert drv.last_exit("vm1") == _process.ExitStatus(pid, **ended)
    assert not os.path.exists(f"/proc/{pid}")  # reaped: no zombie with that pid
    assert _zombie_qemu_children() == []
    assert await drv.get_instance_info("vm1") is None
    with pytest.raises(hv.InstanceNotFound, match=f"vm1 is not running.*pid {pid} {re.escape(how)}"):
        await drv.qmp_command("vm1", "query-status")
    assert drv.run_dir.dir("vm1").exists()  # leftovers until cleanup
    await drv.cleanup_instance("vm1")
    assert not drv.run_dir.dir("vm1").exists()
    result = await drv.stop_instance(None, name="vm1", retry=True)
    assert result.stage is hv.StopStage.ALREADY_STOPPED


async def test_agent_restart_refinds_instances(nodes: Nodes) -> None:
    first = nodes.make("n1")
    await first.start_instance(instance(name="vm1", mem=64))
    await first.start_instance(instance(name="vm2", mem=64), startup_paused=True)
    pids = {i.name: i.id for i in await first.get_all_instances_info()}
    await first.aclose()  # the agent goes away; QEMU keeps running

    second = nodes.make("n1")
    assert await second.list_instances() == ["vm1", "vm2"]
    infos = {i.name: i for i in await second.get_all_instances_info()}
    assert {n: i.id for n, i in infos.items()} == pids
    assert infos["vm1"].runstate == "running" and infos["vm2"].runstate == "prelaunch"
    result = await second.stop_instance(None, name="vm2", force=True)
    assert result.stage is hv.StopStage.MONITOR
    assert await second.list_instances() == ["vm1"]


def _affinity(tid: int) -> set[int]:
    return os.sched_getaffinity(tid)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning vCPUs to different CPUs needs 2 CPUs")
async def test_cpu_mask_pins_process_and_vcpus(nodes: Nodes) -> None:
    drv = nodes.make("n1")
    await drv.start_instance(instance(name="one", mem=64, cpu_mask="1"))
    pid = drv.run_dir.pid("one")
    assert pid is not None
    assert all(_affinity(int(t)) == {1} for t in os.listdir(f"/proc/{pid}/task"))

    await drv.start_instance(instance(name="two", mem=64, vcpus=2, cpu_mask="1:0"))
    vcpus = sorted(await drv.qmp_command("two", "query-cpus-fast"), key=lambda c: c["cpu-index"])
    assert [_affinity(c["thread-id"]) for c in vcpus] == [{1}, {0}]

    with pytest.raises(hv.ParameterError, match="3 entries for 2 vCPUs"):
        await drv.start_instance(instance(name="bad", mem=64, vcpus=2, cpu_mask="0:1:0"))
    possible = hv.params.format_cpu_ranges(hv.params.node_possible_cpus())
    with pytest.raises(hv.ParameterError, match=f"cpu_mask.*CPU 8000 is beyond this node's CPUs {possible}"):
        await drv.start_instance(instance(name="bad", mem=64, vcpus=2, cpu_mask="0:8000"))
    with pytest.raises(hv.ParameterError, match="cpu_mask.*above the maximum CPU number 8191"):
        await drv.start_instance(instance(name="bad", mem=64, vcpus=2, cpu_mask="0:0-30000000"))
    assert not drv.run_dir.dir("bad").exists()
